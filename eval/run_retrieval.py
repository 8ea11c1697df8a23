"""Retrieval evaluation per language of an mlmm export on WebDataset shards.

    python eval/run_retrieval.py --checkpoint runs/demo/export --shards data/test \
        --languages en,de,vi --out results.json

Writes {"results": [{"task", "dataset", "language", "n", "metrics": {...}}]} and prints a table.
"""
import argparse
import sys

import torch

import mlmm
from mlmm.evaluation import markdown_table, save_results
from mlmm.evaluation.runner import evaluate_retrieval


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors)")
    p.add_argument("--shards", required=True, help="shard folder, glob or comma list")
    p.add_argument("--languages", default=None, help="comma list; default: every language in the shards")
    p.add_argument("--dataset", default=None, help="dataset name for the report (default: the shards path)")
    p.add_argument("--out", default="results.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model = mlmm.from_pretrained(args.checkpoint, device=args.device)
    langs = args.languages.split(",") if args.languages else None
    records = evaluate_retrieval(model, args.shards, languages=langs, dataset=args.dataset or args.shards,
                                 batch_size=args.batch_size, device=args.device)
    if not records:
        print(f"no retrieval task found in {args.shards} for languages {langs}", file=sys.stderr)
        return 1
    save_results(records, args.out)
    print(markdown_table(records))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
