"""VQA evaluation of an export with a ``vqa`` head: official VQAv2 accuracy per language.

    mlmm-eval-vqa --model runs/tiny_vqa/export --shards data/vqa/test --languages en,de,fr

Console command ``mlmm-eval-vqa`` (installed by pip); ``python eval/run_vqa.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation.cli import add_model_arguments, add_test_set_arguments, languages_of, open_mlmm, report
from mlmm.evaluation.vqa import evaluate_vqa


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_test_set_arguments(p, out="results_vqa.json")
    args = p.parse_args(argv)
    model = open_mlmm(args, "a vqa head")
    if model is None:
        return 2
    records = evaluate_vqa(model, args.shards, languages=languages_of(args), dataset=args.dataset or args.shards,
                           batch_size=args.batch_size, device=args.device)
    return report(records, args.out, f"no VQA question found in {args.shards}")


if __name__ == "__main__":
    sys.exit(main())
