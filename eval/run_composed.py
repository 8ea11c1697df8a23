"""Composed image retrieval (reference image + modification text -> target image) per language.

    python eval/run_composed.py --checkpoint runs/tiny_cir/export --shards data/cir_test/shards \
        --languages en,de,fr --out composed.json

Recall@1/10/50 of the target (CIRR / FashionIQ protocol, the reference removed from the gallery) for the composed
query and, on the same queries, the text-only, image-only and image+text-sum baselines
(:mod:`mlmm.evaluation.composed`). Writes {"results": [...]} and prints a table.
"""
import argparse
import sys

import torch

import mlmm
from mlmm.evaluation import save_results
from mlmm.evaluation.composed import MODES, evaluate_composed, markdown_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="export folder (config.json + model.safetensors)")
    p.add_argument("--shards", required=True, help="shard folder, glob or comma list with triplets (+ gallery)")
    p.add_argument("--languages", default=None, help="comma list; default: every modification language")
    p.add_argument("--modes", default=",".join(MODES), help=f"query modes among {','.join(MODES)}")
    p.add_argument("--ks", default="1,10,50")
    p.add_argument("--dataset", default=None, help="dataset name for the report (default: the shards path)")
    p.add_argument("--out", default="composed.json")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    model = mlmm.from_pretrained(args.checkpoint, device=args.device)
    ks = tuple(int(k) for k in args.ks.split(","))
    modes = args.modes.split(",")
    records = evaluate_composed(model, args.shards, languages=args.languages.split(",") if args.languages else None,
                                dataset=args.dataset or args.shards, ks=ks, modes=modes,
                                batch_size=args.batch_size, device=args.device)
    if not records:
        print(f"no composed-retrieval queries in {args.shards} for languages {args.languages}", file=sys.stderr)
        return 1
    save_results(records, args.out)
    print(markdown_table(records, modes, ks))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
