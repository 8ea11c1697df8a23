"""Run an evaluation suite: every task x dataset x language it names, one command.

    python eval/run_suite.py --checkpoint RUN/export --config eval/configs/demo.yaml [--out results/]

Suite YAML::

    name: demo
    tasks:
      - {task: retrieval, dataset: generated, shards: runs/demo/shards/test_generated, languages: [en, de, fr]}
      - {task: vqa, dataset: shapes-vqa, shards: data/vqa/test, languages: [en, de, fr]}
      - {task: captioning, dataset: images_vi, shards: data/vi_test, languages: [vi], decoding: beam, beam_size: 3}

Relative shard paths are resolved against the suite file's folder, then the working directory. ``checkpoint:`` may
name the export per task (a model with a vqa / caption head), default ``--checkpoint``. A task whose model lacks
the needed tower / head, or whose shards are missing, is skipped with a message (``--strict`` makes it an error).
Writes ``results.json`` (one record per task / dataset / language, the retrieval record schema), ``results.md``
(one table per task, languages as rows) and ``results.png`` (the headline metric per language, grouped bars).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mlmm.evaluation.suite import run_suite  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=None, help="export folder (default: each task's checkpoint)")
    p.add_argument("--config", required=True, help="suite YAML (eval/configs/*.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: <checkpoint>/../eval_<suite name>)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--strict", action="store_true", help="fail on a task that cannot run instead of skipping it")
    args = p.parse_args(argv)
    paths = run_suite(args.config, checkpoint=args.checkpoint, out_dir=args.out, device=args.device,
                      strict=args.strict)
    print(Path(paths["md"]).read_text(encoding="utf-8"))
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
