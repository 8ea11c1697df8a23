"""Write the open_clip / transformers forms of an mlmm export, for local use.

    python -m mlmm.hub.convert --checkpoint runs/x/export --to open_clip                 # adds open_clip files in place
    python -m mlmm.hub.convert --checkpoint runs/x/export --to transformers --out runs/x/text

``open_clip`` (default ``--out`` = the export itself) adds ``open_clip_config.json`` + ``open_clip_model.safetensors``
and merges the text config into ``config.json``; the folder then loads with
``open_clip.create_model_and_transforms("local-dir:FOLDER")`` (its absolute path is recorded: re-run after moving
it). ``transformers`` writes the text tower as a plain transformers folder (default ``--out`` = ``EXPORT/../text``).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

from mlmm.hub.download import from_pretrained
from mlmm.hub.interop_open_clip import NotOpenClipCompatible, export_open_clip
from mlmm.hub.interop_transformers import export_transformers_text


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="an mlmm export folder or Hub repo id")
    p.add_argument("--to", required=True, choices=("open_clip", "transformers"))
    p.add_argument("--out", help="output folder (see the defaults above)")
    args = p.parse_args(argv)
    if not args.out and not Path(args.checkpoint).is_dir():
        p.error("--out is required when --checkpoint is a Hub repo id")
    model = from_pretrained(args.checkpoint)
    if args.to == "open_clip":
        out = Path(args.out or args.checkpoint)
        try:
            export_open_clip(model, out)
        except NotOpenClipCompatible as e:
            print(f"error: {e}")
            return 2
        print(f"open_clip: create_model_and_transforms('local-dir:{out.resolve()}')")
    else:
        out = export_transformers_text(model, args.out or Path(args.checkpoint).parent / "text")
        print(f"transformers: AutoModel.from_pretrained('{out}') + {out / 'mlmm_text_encoder.py'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
