"""Train an mlmm model from a YAML config.

    deepspeed recipes/train.py --config recipes/configs/tiny_clip.yaml train.max_steps=50
    python recipes/train.py --config recipes/configs/tiny_clip.yaml      # one process (CPU: gloo)

Trailing ``section.key=value`` arguments override the YAML. The DeepSpeed launcher's
``--local_rank=N`` is accepted (the rank comes from the environment).

Exit codes: 0 done; 2 a config error (one line naming the key and file); 3 refused by the state of
``output_dir`` (another run holds it, its checkpoint is damaged, untrusted or from another run config: one line
naming the culprit, and nothing in the folder was changed).
"""
import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from mlmm.config import ConfigError, load_config
from mlmm.training import Trainer
from mlmm.training.errors import RunRefused


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-export", action="store_true", help="skip writing <output_dir>/export")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    rank0, trainer = os.environ.get("RANK", "0") == "0", None
    try:  # every bad value is one line naming the key and the file, exit code 2, no traceback
        cfg = load_config(args.config, args.overrides)
        trainer = Trainer(cfg)
        trainer.setup()
    except (ConfigError, RunRefused) as e:  # raised on every rank alike: rank 0 says it
        if trainer is not None:
            trainer.cleanup(failed=True)  # closes the log, releases the folder if this run took it; no barrier
        if isinstance(e, RunRefused):
            if rank0:
                print(f"refused: {e}", file=sys.stderr)
            return 3  # the output folder's state forbids the run, left unchanged
        if rank0:
            msg, path = " ".join(str(e).split()), str(Path(args.config))
            print(f"config error: {msg if path in msg else f'{path}: {msg}'}", file=sys.stderr)
        return 2
    except BaseException:
        if trainer is not None:
            trainer.cleanup(failed=True)  # no barrier: see below
        raise
    try:
        trainer.train()
        if not args.no_export:
            trainer.export()
    except BaseException:
        # no barrier on the way out: the other ranks may be inside a collective this process will never join;
        # they stop when this process's connections close (or their launcher stops them)
        trainer.cleanup(failed=True)
        raise
    trainer.cleanup(destroy_process_group=True)
    return 0


def _exit_now(code: int) -> None:
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli(argv=None) -> None:
    """main() as a process: on an error, print it and leave at once with exit code 1 (2 or 3 for a refusal), skipping
    the interpreter's teardown, which can wait on collectives that will never complete (NCCL), delays the other ranks
    noticing, and aborts (SIGABRT, "terminate called without an active exception") under gloo when the process group
    was not destroyed."""
    try:
        code = main(argv)
    except Exception:
        traceback.print_exc()
        _exit_now(1)
    if code:
        _exit_now(code)
    sys.exit(code)


if __name__ == "__main__":
    cli()
