"""A tiny randomly initialised open_clip teacher written to disk, for tests and the tiny recipes.

    python -m mlmm.distill.tiny --out runs/tiny_teacher      # -> tiny-clip.json + tiny-clip.safetensors

It is loaded back exactly like a real one: ``teacher: {kind: open_clip, model_config: DIR/tiny-clip.json,
checkpoint: DIR/tiny-clip.safetensors}`` (``open_clip.add_model_config`` + ``create_model(pretrained=FILE)``).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

TINY_CLIP = {  # 32-px ViT and a 1-layer text transformer (open_clip's BPE vocab, no download), embed 32
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_open_clip(out_dir: str | Path, seed: int = 0, name: str = "tiny-clip") -> dict[str, str]:
    """Write ``<name>.json`` + ``<name>.safetensors``; return the teacher config mapping."""
    import open_clip
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg_path, weights = out / f"{name}.json", out / f"{name}.safetensors"
    cfg_path.write_text(json.dumps(TINY_CLIP, indent=1))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    return {"kind": "open_clip", "arch": name, "model_config": str(cfg_path), "checkpoint": str(weights)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = write_tiny_open_clip(args.out, args.seed)
    print(" ".join(f"loss.teacher.{k}={v}" for k, v in cfg.items()))


if __name__ == "__main__":
    main()
