"""Compare models: merge results files into one markdown table and one plot (models x languages).

    mlmm-eval --model runs/mine --config eval/configs/xtd10.yaml --out results/mine
    mlmm-eval --model open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k --config eval/configs/xtd10.yaml \
        --out results/oc
    mlmm-compare results/mine/results.json results/oc/results.json --out results/compare

Takes mlmm results.json files, folders of JSON files, and CLIP_benchmark's per-run JSON output. Each cell is the
task's headline metric (mean R@1, zero-shot acc1, VQA accuracy, CIDEr-D) or ``--metric KEY``; the best per
language is bold. Writes OUT.md and OUT.png and prints the table.

Console command ``mlmm-compare`` (installed by pip); ``python eval/compare.py`` is the same.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlmm.evaluation.compare import compare


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="results.json files, folders of *.json, CLIP_benchmark outputs")
    p.add_argument("--out", default="compare", help="output path without suffix: writes OUT.md and OUT.png")
    p.add_argument("--metric", default=None, help="metric key to show (default: each task's headline metric)")
    p.add_argument("--label", action="append", default=[], metavar="PATH=NAME",
                   help="model name for the records of PATH that carry none (older results files)")
    args = p.parse_args(argv)
    labels = dict(x.split("=", 1) for x in args.label)
    try:
        paths = compare(args.results, args.out, metric=args.metric, labels=labels)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    print(f"wrote {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
