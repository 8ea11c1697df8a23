"""Run an evaluation suite: every task x dataset x language it names, one command, for any model.

    mlmm-eval --model runs/demo --config eval/configs/demo.yaml [--out results/]
    mlmm-eval --model open_clip:ViT-B-32,pretrained=laion2b_s34b_b79k --config eval/configs/X.yaml
    torchrun --nproc_per_node 2 eval/run_suite.py --model ... --config ...   # ranks split the test sets

Suite YAML::

    name: demo
    tasks:
      - {task: retrieval, dataset: generated, shards: runs/demo/shards/test_generated, languages: [en, de, fr]}
      - {task: zeroshot, dataset: fsdd, shards: data/fsdd_test, classes: fsdd, languages: [en, de, fr, es]}
      - {task: vqa, dataset: shapes-vqa, shards: data/vqa/test, languages: [en, de, fr]}
      - {task: captioning, dataset: images_vi, shards: data/vi_test, languages: [vi], decoding: beam, beam_size: 3}

Relative paths are resolved against the suite file's folder, then the working directory. ``model:`` (or
``checkpoint:``) may name the model per task (e.g. an mlmm export with a vqa / caption head), default ``--model``.
Zero-shot tasks take ``classes`` (a dataset of the prompts YAML, a classes YAML, default the shard folder's
classes.yaml), ``modality`` and ``prompts`` (your YAML files on top of mlmm's). A task whose model lacks the needed
tower / head, or whose shards are missing, is skipped with a message (``--strict`` makes it an error); a model that
does not load is an error (one line, exit 2). Writes ``results.json`` (one record per task / dataset / language,
with ``model``, ``pretrained`` and per-reason ``skipped`` counts), ``results.md`` and ``results.png``; compare
several with ``eval/compare.py``.

Console command ``mlmm-eval`` (installed by pip); ``python eval/run_suite.py`` is the same.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mlmm.evaluation.cli import add_model_arguments, device_of, model_spec
from mlmm.evaluation.distributed import cleanup, init_eval_distributed, is_main
from mlmm.evaluation.models import ModelLoadError
from mlmm.evaluation.suite import run_suite


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p, required=False)
    p.add_argument("--config", required=True, help="suite YAML (eval/configs/*.yaml)")
    p.add_argument("--out", default=None, help="output folder (default: beside the model folder, eval_<suite name>)")
    p.add_argument("--strict", action="store_true", help="fail on a task that cannot run instead of skipping it")
    args = p.parse_args(argv)
    init_eval_distributed()
    try:
        paths = run_suite(args.config, model=model_spec(args), pretrained=args.pretrained, out_dir=args.out,
                          device=device_of(args), strict=args.strict, workers=args.workers)
    except (ModelLoadError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if is_main():
        print(Path(paths["md"]).read_text(encoding="utf-8"))
        print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
