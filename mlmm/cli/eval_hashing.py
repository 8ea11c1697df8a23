"""Cross-modal hashing evaluation per language of an mlmm export with a hash head.

    mlmm-eval-hashing --model runs/tiny_hashing/export --shards data/test \
        --languages en,de --relevance labels --out hashing_results.json

Scores t2x and x2t for every hashed media modality: mAP@all, mAP@R, P@k, Hamming-radius precision
(P@H<=r), their random-ranking expectations (chance_*), and the float-embedding baseline (``*_float_*``).
Writes {"results": [{"task": "<m>-text-hashing", "dataset", "language", "n", "metrics": {...}}]}.

Console command ``mlmm-eval-hashing`` (installed by pip); ``python eval/run_hashing.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation.cli import add_model_arguments, add_test_set_arguments, languages_of, open_mlmm
from mlmm.evaluation.hashing import evaluate_hashing
from mlmm.evaluation.report import markdown_table
from mlmm.evaluation.retrieval import save_results

COLUMNS = ["t2{x}_mAP@all", "t2{x}_chance_mAP@all", "t2{x}_mAP@R", "t2{x}_P@10", "t2{x}_P@H<=2",
           "{x}2t_mAP@all", "{x}2t_chance_mAP@all", "{x}2t_mAP@R", "{x}2t_P@10", "{x}2t_P@H<=2",
           "t2{x}_float_mAP@all", "{x}2t_float_mAP@all"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_test_set_arguments(p, out="hashing_results.json")
    p.add_argument("--head", default=None, help="hash head instance (default: the model's only hash head)")
    p.add_argument("--relevance", choices=("labels", "class", "identity"), default="labels")
    p.add_argument("--radius", type=int, default=2)
    p.add_argument("--no-float", action="store_true", help="skip the float-embedding baseline")
    args = p.parse_args(argv)
    model = open_mlmm(args, "a hash head")
    if model is None:
        return 2
    records = evaluate_hashing(model, args.shards, head=args.head, languages=languages_of(args),
                               dataset=args.dataset or args.shards, relevance=args.relevance, radius=args.radius,
                               float_baseline=not args.no_float, batch_size=args.batch_size, device=args.device)
    if not records:
        print(f"no hashing task found in {args.shards}", file=sys.stderr)
        return 1
    save_results(records, args.out)
    for task in dict.fromkeys(r["task"] for r in records):
        x = task.split("-")[0][0]
        cols = [c.format(x=x).replace("_P@H<=2", f"_P@H<={args.radius}") for c in COLUMNS]
        print(markdown_table([r for r in records if r["task"] == task],
                             metrics=[c for c in cols if c in records[0]["metrics"]]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
