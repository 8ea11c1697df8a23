"""Captioning evaluation of an export with a ``caption`` head: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
(pycocoevalcap) and sacreBLEU / chrF per language.

    mlmm-eval-captioning --model runs/tiny_caption/export --shards data/test --languages en,vi \
        --decoding beam --beam-size 3

Console command ``mlmm-eval-captioning`` (installed by pip); ``python eval/run_captioning.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation import markdown_table, save_results
from mlmm.evaluation.captioning import evaluate_captioning
from mlmm.evaluation.cli import add_model_arguments, open_model


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--languages", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--decoding", choices=("greedy", "beam"), default="beam")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--no-meteor", action="store_true")
    p.add_argument("--out", default="results_captioning.json")
    p.add_argument("--batch-size", type=int, default=32)
    args = p.parse_args(argv)
    loaded = open_model(args, needs_mlmm="a caption head")
    if loaded is None:
        return 2
    model, args.device = loaded.mlmm, str(loaded.device)
    records = evaluate_captioning(model, args.shards, languages=args.languages.split(",") if args.languages else None,
                                  dataset=args.dataset or args.shards, method=args.decoding, beam_size=args.beam_size,
                                  batch_size=args.batch_size, device=args.device, meteor=not args.no_meteor)
    if not records:
        print(f"nothing to caption in {args.shards} for the decoder's languages", file=sys.stderr)
        return 1
    save_results(records, args.out)
    print(markdown_table(records))
    for r in records:
        print(f"{r['language']}: tokenisation {r['info']['tokenization']}, examples: {r['info']['examples'][:2]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
