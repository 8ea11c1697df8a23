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

from mlmm.evaluation.cli import add_model_arguments, add_test_set_arguments, languages_of, open_mlmm, report
from mlmm.evaluation.composed import MODES, evaluate_composed, markdown_table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    add_test_set_arguments(p, out="composed.json")  # shards with triplets (+ gallery); languages: of the modifications
    p.add_argument("--modes", default=",".join(MODES), help=f"query modes among {','.join(MODES)}")
    p.add_argument("--ks", default="1,10,50")
    args = p.parse_args(argv)
    model = open_mlmm(args, "a composed-retrieval head")
    if model is None:
        return 2
    ks = tuple(int(k) for k in args.ks.split(","))
    modes = args.modes.split(",")
    records = evaluate_composed(model, args.shards, languages=languages_of(args), dataset=args.dataset or args.shards,
                                ks=ks, modes=modes, batch_size=args.batch_size, device=args.device)
    return report(records, args.out, f"no composed-retrieval queries in {args.shards} for languages {args.languages}",
                  lambda r: markdown_table(r, modes, ks))


if __name__ == "__main__":
    sys.exit(main())
