"""Composed image retrieval (reference image + modification text -> target image) per language.

    mlmm-eval-composed --model runs/tiny_cir/export --shards data/cir_test/shards \
        --languages en,de,fr --out composed.json

Recall@1/10/50 of the target (CIRR / FashionIQ protocol, the reference removed from the gallery) for the composed
query and, on the same queries, the text-only, image-only and image+text-sum baselines
(:mod:`mlmm.evaluation.composed`). Writes {"results": [...]} and prints a table.

Console command ``mlmm-eval-composed`` (installed by pip); ``python eval/run_composed.py`` is the same.
"""
import argparse
import sys

from mlmm.evaluation import save_results
from mlmm.evaluation.cli import add_model_arguments, open_model
from mlmm.evaluation.composed import MODES, evaluate_composed, markdown_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--shards", required=True, help="shard folder, glob or comma list with triplets (+ gallery)")
    p.add_argument("--languages", default=None, help="comma list; default: every modification language")
    p.add_argument("--modes", default=",".join(MODES), help=f"query modes among {','.join(MODES)}")
    p.add_argument("--ks", default="1,10,50")
    p.add_argument("--dataset", default=None, help="dataset name for the report (default: the shards path)")
    p.add_argument("--out", default="composed.json")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args(argv)
    loaded = open_model(args, needs_mlmm="a composed-retrieval head")
    if loaded is None:
        return 2
    model, args.device = loaded.mlmm, str(loaded.device)
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
