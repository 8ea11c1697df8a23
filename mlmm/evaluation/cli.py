"""What every eval entry point shares: the ``--model`` flag, one-line load errors, ranks and workers.

    p = argparse.ArgumentParser(); add_model_arguments(p)
    args = p.parse_args(); model = open_model(args)     # None after printing one line to stderr (exit 2)
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional

MODEL_HELP = ("the model: an mlmm run folder (uses its export/) or export folder, mlmm:ORG/NAME, "
              "open_clip:ARCH,pretrained=TAG|FILE, hf-hub:ORG/NAME, local-dir:PATH (open_clip), "
              "transformers:ID|PATH, mclip:TEXT,image=ARCH,pretrained=TAG (see docs/evaluation.md)")


def add_model_arguments(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--checkpoint", default=None, help="same as --model (kept for older scripts)")
    p.add_argument("--pretrained", default=None, help="open_clip pretrained tag or file (or pretrained= in --model)")
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding the test set (0 = in process)")
    p.set_defaults(_model_required=required)


def model_spec(args) -> Optional[str]:
    return args.model or args.checkpoint


def device_of(args) -> str:
    from mlmm.evaluation.distributed import device

    return args.device or str(device())


def open_model(args, *, needs_mlmm: str = ""):
    """Load ``--model`` (:func:`mlmm.evaluation.models.load_model`); on failure print one line and return None.

    ``needs_mlmm``: the task needs an mlmm model (its heads), e.g. "a vqa head"."""
    from mlmm.evaluation.models import ModelLoadError, load_model

    spec = model_spec(args)
    if not spec:
        print("error: --model is required", file=sys.stderr)
        return None
    try:
        model = load_model(spec, device_of(args), pretrained=args.pretrained)
    except ModelLoadError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if needs_mlmm and model.mlmm is None:
        print(f"error: {spec}: this task needs an mlmm model with {needs_mlmm}; {model.name} is not an mlmm model",
              file=sys.stderr)
        return None
    return model


def open_mlmm(args, needs: str):
    """The mlmm model of ``--model`` for a task that needs its heads (``needs``, e.g. "a vqa head"), with
    ``args.device`` set to where it was loaded; None after printing one line (exit 2)."""
    loaded = open_model(args, needs_mlmm=needs)
    if loaded is None:
        return None
    args.device = str(loaded.device)
    return loaded.mlmm


def add_test_set_arguments(p: argparse.ArgumentParser, *, out: str, batch_size: int = 64) -> None:
    """The test set and the report: ``--shards`` (required), ``--languages``, ``--dataset``, ``--out``,
    ``--batch-size``."""
    p.add_argument("--shards", required=True, help="shard folder, glob, brace range or comma list")
    p.add_argument("--languages", default=None, help="comma list; default: every language in the shards")
    p.add_argument("--dataset", default=None, help="dataset name for the report (default: the shards path)")
    p.add_argument("--out", default=out)
    p.add_argument("--batch-size", type=int, default=batch_size)


def languages_of(args) -> Optional[list[str]]:
    """``--languages`` as a list (None: every language)."""
    return args.languages.split(",") if args.languages else None


def report(records: list[dict], out: str, empty: str, table: Optional[Callable[[list[dict]], str]] = None) -> int:
    """Rank 0 writes ``records`` to ``out`` and prints their table (``table(records)``, default
    :func:`mlmm.evaluation.markdown_table`); -> the exit code (1 with ``empty`` printed when there is no record)."""
    from mlmm.evaluation import markdown_table, save_results
    from mlmm.evaluation.distributed import is_main

    if not records:
        print(empty, file=sys.stderr)
        return 1
    if is_main():
        save_results(records, out)
        print((table or markdown_table)(records))
        print(f"\nwrote {out}")
    return 0
