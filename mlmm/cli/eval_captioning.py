"""Captioning evaluation of an export with a ``caption`` head: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D
(pycocoevalcap) and sacreBLEU / chrF per language.

    mlmm-eval-captioning --model runs/tiny_caption/export --shards data/test --languages en,vi \
        --decoding beam --beam-size 3

Console command ``mlmm-eval-captioning`` (installed by pip); ``python eval/run_captioning.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation import markdown_table
from mlmm.evaluation.captioning import evaluate_captioning
from mlmm.evaluation.cli import add_model_arguments, add_test_set_arguments, languages_of, open_mlmm, report


def table(records: list[dict]) -> str:
    """The metrics table, then each language's tokenisation and two example captions."""
    return "\n".join([markdown_table(records)] + [
        f"{r['language']}: tokenisation {r['info']['tokenization']}, examples: {r['info']['examples'][:2]}"
        for r in records])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_test_set_arguments(p, out="results_captioning.json", batch_size=32)
    p.add_argument("--decoding", choices=("greedy", "beam"), default="beam")
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--no-meteor", action="store_true")
    args = p.parse_args(argv)
    model = open_mlmm(args, "a caption head")
    if model is None:
        return 2
    records = evaluate_captioning(model, args.shards, languages=languages_of(args), dataset=args.dataset or args.shards,
                                  method=args.decoding, beam_size=args.beam_size, batch_size=args.batch_size,
                                  device=args.device, meteor=not args.no_meteor)
    return report(records, args.out, f"nothing to caption in {args.shards} for the decoder's languages", table)


if __name__ == "__main__":
    sys.exit(main())
