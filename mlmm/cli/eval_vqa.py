"""VQA evaluation of an export with a ``vqa`` head: official VQAv2 accuracy per language.

    mlmm-eval-vqa --model runs/tiny_vqa/export --shards data/vqa/test --languages en,de,fr

Console command ``mlmm-eval-vqa`` (installed by pip); ``python eval/run_vqa.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation import markdown_table, save_results
from mlmm.evaluation.cli import add_model_arguments, open_model
from mlmm.evaluation.vqa import evaluate_vqa


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--shards", required=True)
    p.add_argument("--languages", default=None)
    p.add_argument("--dataset", default=None)
    p.add_argument("--out", default="results_vqa.json")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    loaded = open_model(args, needs_mlmm="a vqa head")
    if loaded is None:
        return 2
    model, args.device = loaded.mlmm, str(loaded.device)
    records = evaluate_vqa(model, args.shards, languages=args.languages.split(",") if args.languages else None,
                           dataset=args.dataset or args.shards, batch_size=args.batch_size, device=args.device)
    if not records:
        print(f"no VQA question found in {args.shards}", file=sys.stderr)
        return 1
    save_results(records, args.out)
    print(markdown_table(records))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
