"""Load an mlmm model from a local export folder or a Hugging Face Hub repo id.

    model = from_pretrained("runs/x/export")           # a local folder: read as is
    model = from_pretrained("runs/x")                  # a run folder: its export/
    model = from_pretrained("org/name")                # huggingface_hub.snapshot_download, then the same loader
    model = from_pretrained("org/name@v1.0")           # a branch, tag or commit of the repo
    HF_HUB_OFFLINE=1 python ...                        # repo ids resolve from the local cache (HF_HUB_CACHE) only

Only the files mlmm reads are fetched (config, safetensors weights, tokenizer, card): the open_clip weights and the
transformers ``text/`` folder that ``mlmm.hub.publish`` adds are skipped.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from mlmm.hub.export import load_export
from mlmm.sources import HubId, parse_source

IGNORE_PATTERNS = ["open_clip_*", "text/*", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5"]


def resolve_pretrained(name_or_path: str | Path, *, revision: Optional[str] = None,
                       cache_dir: Optional[str | Path] = None, token: Optional[str] = None) -> Path:
    """A local folder (returned as is; a run folder gives its ``export/``) or a Hub repo id ``org/name[@revision]``
    (downloaded / found in the cache) -> local folder. :func:`mlmm.sources.parse_source` tells the two apart."""
    src = parse_source(name_or_path)
    if isinstance(src, Path):
        if not src.exists():
            raise FileNotFoundError(f"{name_or_path}: no such folder, and not a Hugging Face Hub repo id ('org/name')")
        if not src.is_dir():
            raise NotADirectoryError(f"{src}: an mlmm export is a folder (config.json + model.safetensors)")
        if not (src / "config.json").is_file() and (src / "export" / "config.json").is_file():
            return src / "export"  # a run folder: the export the Trainer wrote into it
        return src
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    import mlmm

    hub = HubId(src.repo_id, revision or src.revision)
    try:
        local = snapshot_download(hub.repo_id, revision=hub.revision, cache_dir=cache_dir, token=token,
                                  ignore_patterns=IGNORE_PATTERNS, library_name="mlmm",
                                  library_version=mlmm.__version__)
    except (HfHubHTTPError, OSError, ValueError) as e:  # not found / gated / offline and not cached / bad id
        where = cache_dir or constants.HF_HUB_CACHE
        hint = (f" HF_HUB_OFFLINE is set: only the local cache {where} was searched; download it once online."
                if constants.HF_HUB_OFFLINE else "")
        raise FileNotFoundError(f"{hub}: not a local folder, and the Hub repo could not be fetched "
                                f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).{hint} "
                                f"Fetch it with: {hub.fetch_command()}") from e
    return Path(local)


def from_pretrained(name_or_path: str | Path, device: str | torch.device = "cpu", *, revision: Optional[str] = None,
                    cache_dir: Optional[str | Path] = None, token: Optional[str] = None):
    """Rebuild a MultimodalModel (eval mode) from a local export folder or a Hub repo id."""
    folder = resolve_pretrained(name_or_path, revision=revision, cache_dir=cache_dir, token=token)
    return load_export(folder, device=device)
