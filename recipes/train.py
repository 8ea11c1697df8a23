"""Train an mlmm model from a YAML config.

    deepspeed recipes/train.py --config recipes/configs/tiny_clip.yaml train.max_steps=50
    python recipes/train.py --config recipes/configs/tiny_clip.yaml      # one process (CPU: gloo)

Trailing ``section.key=value`` arguments override the YAML. The DeepSpeed launcher's
``--local_rank=N`` is accepted (the rank comes from the environment).
"""
import argparse
import sys

from mlmm.config import ConfigError, load_config
from mlmm.training import Trainer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML run config")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-export", action="store_true", help="skip writing <output_dir>/export")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    trainer = Trainer(cfg).setup()
    try:
        trainer.train()
        if not args.no_export:
            trainer.export()
    finally:
        trainer.cleanup(destroy_process_group=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
