"""Zero-shot classification per language (image, video or audio) of any model, as CLIP_benchmark defines it.

    mlmm-eval-zeroshot --model runs/fsdd --shards data/fsdd_test --classes fsdd --languages en,de,fr,es
    mlmm-eval-zeroshot --model open_clip:ViT-B-32,pretrained=openai --shards data/my_classes   # classes.yaml
    mlmm-eval-zeroshot ... --prompts my_prompts.yaml    # your templates / class names on top of mlmm's

``--classes``: a dataset of the prompts YAML (mlmm/evaluation/zeroshot.yaml + your --prompts files), a classes
YAML, or a shard folder with classes.yaml (the classification builders write one; the default is --shards).
Writes {"results": [{"task": "zeroshot_classification", "dataset", "language", "model", "pretrained",
"metrics": {"acc1", "acc5", "mean_per_class_recall"}, "modality", "skipped", ...}]} and prints a table.

Console command ``mlmm-eval-zeroshot`` (installed by pip); ``python eval/run_zeroshot.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation.cli import add_model_arguments, open_model, report
from mlmm.evaluation.distributed import cleanup, init_eval_distributed
from mlmm.evaluation.zeroshot import evaluate_zeroshot
from mlmm.modalities import MEDIA


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--shards", required=True, help="shard folder, glob, brace range or comma list")
    p.add_argument("--classes", default=None, help="dataset name | classes YAML | shard folder (default: --shards)")
    p.add_argument("--modality", choices=list(MEDIA), default=None,
                   help="default: the class set's modality, else image")
    p.add_argument("--prompts", action="append", default=[], help="extra prompts YAML (repeatable)")
    p.add_argument("--languages", default=None, help="comma list; default: every language with names and templates")
    p.add_argument("--dataset", default=None, help="dataset name for the report (default: the class set's name)")
    p.add_argument("--out", default="zeroshot.json")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    init_eval_distributed()
    try:
        model = open_model(args)
        if model is None:
            return 2
        try:
            records = evaluate_zeroshot(model, args.shards, classes=args.classes or args.shards,
                                        modality=args.modality, prompts=args.prompts, dataset=args.dataset or "",
                                        languages=args.languages.split(",") if args.languages else None,
                                        batch_size=args.batch_size, num_workers=args.workers)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return report(records, args.out, f"no zero-shot result for {args.shards}")
    finally:
        cleanup()


if __name__ == "__main__":
    sys.exit(main())
