"""Pretrained weights by local path or Hub id, through the Hugging Face and open_clip caches.

    enc = load_hf(AutoModel.from_pretrained, "FacebookAI/xlm-roberta-base", "model.text.pretrained")
    tok = load_hf(AutoTokenizer.from_pretrained, "org/name@v1.0", "model.text.tokenizer")
    src = resolve_open_clip("ViT-B-32", pretrained="laion2b_s34b_b79k", where="loss.teacher")
    clip = src.create()                      # open_clip.create_model with exactly those weights (or an error)

Hugging Face ids (``org/name``, ``name``, ``org/name@revision``; :func:`mlmm.sources.parse_source` decides id vs
path) load with transformers' ``from_pretrained`` against the HF cache (``HF_HOME`` / ``HF_HUB_CACHE``). open_clip
weights are an ``arch`` plus a pretrained tag (``ViT-B-32`` + ``laion2b_s34b_b79k``, or the one-string form
``ViT-B-32:laion2b_s34b_b79k`` of ``open_clip.list_pretrained(as_str=True)``), a weights file, ``hf-hub:org/name``
(``@revision`` allowed) or ``local-dir:DIR``; they go through open_clip's own download functions, which use the same
HF cache (tags with only a URL: open_clip's ``~/.cache/clip``).

With ``HF_HUB_OFFLINE=1`` everything resolves from the caches. Whatever is missing raises ``FileNotFoundError`` in one
line naming the config key, the id and the command that fetches it (``hf download org/name``). Online, transformers and
open_clip download into those caches as usual. Nothing here ever falls back to random weights: an open_clip source
without weights is an error (``require_pretrained``).
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from mlmm.sources import HubId, parse_source

log = logging.getLogger("mlmm")

OPEN_CLIP_FILES = "open_clip_*"  # what open_clip reads from a Hub repo (config + weights)
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"


def _not_cached(where: str, what: str, command: str, error: Optional[BaseException] = None) -> FileNotFoundError:
    from huggingface_hub import constants

    state = (f"is not in the Hugging Face cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE=1)" if constants.HF_HUB_OFFLINE
             else f"could not be fetched ({_first_line(error)})" if error is not None else "is not cached")
    return FileNotFoundError(f"{where}: {what} {state}; fetch it once with: {command}")


def require_cached(hub: HubId, where: str) -> None:
    """Offline (``HF_HUB_OFFLINE=1``): raise the one-line error unless a snapshot of ``hub`` is in the HF cache."""
    from huggingface_hub import constants, snapshot_download

    if not constants.HF_HUB_OFFLINE:
        return
    try:
        snapshot_download(hub.repo_id, revision=hub.revision, local_files_only=True)
    except (OSError, ValueError) as e:  # LocalEntryNotFoundError is an OSError
        raise _not_cached(where, str(hub), hub.fetch_command()) from e


def load_hf(loader: Callable[..., Any], value: str, where: str, **kwargs) -> Any:
    """``loader(name_or_path, **kwargs)`` (``AutoModel.from_pretrained``, ``AutoTokenizer.from_pretrained``, ...) for
    a local folder or a Hub id; errors name ``where`` (the config key) and, for ids, the fetch command."""
    src = parse_source(value)
    if isinstance(src, Path):
        if not src.exists():
            raise FileNotFoundError(f"{where}: {value}: no such file or folder, and not a Hugging Face Hub id "
                                    "('org/name' or 'org/name@revision')")
        return loader(str(src), **kwargs)
    require_cached(src, where)
    try:
        return loader(src.repo_id, revision=src.revision, **kwargs)
    except OSError as e:  # transformers: not found / not reachable / gated
        raise _not_cached(where, str(src), src.fetch_command(), e) from e


def hub_base_model(value: Optional[str]) -> Optional[str]:
    """The Hub repo id of a ``pretrained`` value (None for local paths): a model card's ``base_model``."""
    src = parse_source(value) if value else None
    return src.repo_id if isinstance(src, HubId) else None


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------------------ open_clip
@dataclass
class OpenClipSource:
    """A resolved open_clip model: ``model_name`` for ``create_model`` (a built-in / registered arch or
    ``local-dir:<folder>``), the local ``weights`` file (None: random, only when the caller allowed it) and an
    ``identity`` for provenance (arch, tag / Hub id / file; ``sha256`` of the weights file when known)."""

    model_name: str
    weights: Optional[str]
    identity: dict = field(default_factory=dict)
    tokenizer_name: Optional[str] = None  # open_clip.get_tokenizer argument, default model_name
    tag: Optional[str] = None  # an open_clip pretrained tag of model_name (its weights file is ``weights``)

    def create(self):
        """The open_clip model with exactly these weights (``require_pretrained``: never silently random).

        A tag is passed to open_clip as the tag, not as its (cached) weights file, so that open_clip applies the
        image mean/std and resize of the tag's preprocessing (given the bare file, it would use the architecture's
        defaults); a tag trained with QuickGELU (OpenAI's weights under a plain arch name) gets QuickGELU, where
        open_clip would only warn and build exact GELU: a different function than the weights were trained as."""
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg

        local_dir = self.model_name.startswith("local-dir:")
        pretrained = None if local_dir else (self.tag or self.weights)
        quick_gelu = bool(self.tag and get_pretrained_cfg(self.model_name, self.tag).get("quick_gelu"))
        return open_clip.create_model(self.model_name, pretrained=pretrained, load_weights=True,
                                      require_pretrained=self.weights is not None or local_dir,
                                      force_quick_gelu=quick_gelu)

    def tokenizer(self):
        import open_clip

        return open_clip.get_tokenizer(self.tokenizer_name or self.model_name)

    def weights_file(self) -> Optional[Path]:
        if self.weights:
            return Path(self.weights)
        if self.model_name.startswith("local-dir:"):
            from open_clip.factory import _find_checkpoint_in_dir

            found = _find_checkpoint_in_dir(Path(self.model_name[len("local-dir:"):]))
            return Path(found) if found else None
        return None

    def full_identity(self) -> dict:
        """``identity`` plus the weights file's sha256 (hashes the file: call once, at export)."""
        out = dict(self.identity)
        path = self.weights_file()
        if path is not None and path.is_file():
            out["sha256"] = file_sha256(path.resolve())
        return out


def split_open_clip_name(value: str) -> tuple[str, Optional[str]]:
    """``"ViT-B-32:laion2b_s34b_b79k"`` -> ``("ViT-B-32", "laion2b_s34b_b79k")``; schema names
    (``hf-hub:``, ``local-dir:``) and plain archs -> ``(value, None)``."""
    if value.startswith(("hf-hub:", "local-dir:")) or ":" not in value:
        return value, None
    arch, _, tag = value.partition(":")
    return arch, tag


def _download_from_hf(hub: HubId, filename: Optional[str], where: str, what: str) -> str:
    """open_clip's own HF download (safetensors preferred; the HF cache) with the one-line error."""
    from open_clip.pretrained import download_pretrained_from_hf

    try:
        kwargs = {"filename": filename} if filename else {}
        return download_pretrained_from_hf(hub.repo_id, revision=hub.revision, **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        raise _not_cached(where, what, hub.fetch_command(include=OPEN_CLIP_FILES), e) from e


def _resolve_hf_hub(identifier: str, where: str) -> OpenClipSource:
    import json

    hub = parse_source(identifier)
    if not isinstance(hub, HubId):
        raise FileNotFoundError(f"{where}: hf-hub:{identifier}: not a Hugging Face Hub id ('org/name[@revision]')")
    config = Path(_download_from_hf(hub, "open_clip_config.json", where, f"open_clip model hf-hub:{hub}"))
    weights = _download_from_hf(hub, None, where, f"the weights of open_clip model hf-hub:{hub}")
    text_cfg = json.loads(config.read_text(encoding="utf-8")).get("model_cfg", {}).get("text_cfg", {})
    identity = {"hub": hub.repo_id, "revision": config.parent.name, "file": Path(weights).name}
    return OpenClipSource(f"local-dir:{config.parent}", weights, identity,
                          tokenizer_name=f"hf-hub:{hub.repo_id}" if text_cfg.get("hf_tokenizer_name") else None)


def _resolve_tag(arch: str, tag: str, where: str) -> OpenClipSource:
    import open_clip
    from open_clip.pretrained import download_pretrained, get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise FileNotFoundError(f"{where}: {tag!r} is neither a weights file nor an open_clip pretrained tag of "
                                f"{arch} (tags: {', '.join(tags) or 'none'})")
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo, filename = os.path.split(hf_hub)
        command = HubId(repo).fetch_command(filename) if filename else HubId(repo).fetch_command(
            include=OPEN_CLIP_FILES)
    else:
        command = f"python -c \"import open_clip; open_clip.create_model('{arch}', pretrained='{tag}')\""
    try:
        weights = download_pretrained(cfg)
    except Exception as e:  # open_clip wraps hub / URL failures in several types
        raise _not_cached(where, f"open_clip {arch} weights {tag!r}", command, e) from e
    if not weights:
        raise FileNotFoundError(f"{where}: open_clip gave no weights file for {arch}:{tag}; fetch it with: {command}")
    identity = {"arch": arch, "pretrained": tag, "file": Path(weights).name}
    if hf_hub:
        identity["hub"] = os.path.split(hf_hub)[0]
    return OpenClipSource(arch, weights, identity, tag=tag)


def resolve_open_clip(arch: str, pretrained: Optional[str] = None, *, where: str,
                      model_config: Optional[str] = None, allow_random: bool = False) -> OpenClipSource:
    """Resolve open_clip weights to local files through the caches (see the module docstring).

    ``arch``: a built-in name (``ViT-B-32``), ``ARCH:TAG``, ``hf-hub:org/name[@rev]`` or ``local-dir:DIR``;
    ``model_config``: an open_clip JSON model config registered under its file stem (then ``arch`` = that stem);
    ``pretrained``: a tag of ``arch`` or a weights file. No weights at all is an error unless ``allow_random``.
    """
    import open_clip

    arch, tag = split_open_clip_name(arch)
    if tag is not None:
        if pretrained and pretrained != tag:
            raise ValueError(f"{where}: {arch}:{tag} names a tag and pretrained={pretrained!r} another; keep one")
        pretrained = tag
    if arch.startswith("hf-hub:"):
        return _resolve_hf_hub(arch[len("hf-hub:"):], where)
    if arch.startswith("local-dir:"):
        folder = Path(arch[len("local-dir:"):])
        if not (folder / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{where}: {arch}: no open_clip_config.json in that folder")
        source = OpenClipSource(arch, None, {"local_dir": str(folder.resolve())})
        if source.weights_file() is None:
            raise FileNotFoundError(f"{where}: {arch}: no open_clip weights in that folder")
        return source
    if model_config:
        open_clip.add_model_config(model_config)
        arch = Path(model_config).stem
    if not pretrained:
        if not allow_random:
            raise FileNotFoundError(f"{where}: open_clip {arch} without weights (give a pretrained tag or a file)")
        return OpenClipSource(arch, None, {"arch": arch, "random_init": True})
    path = Path(pretrained).expanduser()
    if path.is_file():
        return OpenClipSource(arch, str(path), {"arch": arch, "file": path.name, "path": str(path.resolve())})
    if path.suffix in WEIGHT_SUFFIXES or os.sep in pretrained:
        raise FileNotFoundError(f"{where}: {pretrained}: weights file not found")
    return _resolve_tag(arch, pretrained, where)


def open_clip_weights(value: str, where: str) -> Optional[tuple[str, Optional[dict]]]:
    """An open_clip init source given by name -> (a local weights file or ``local-dir:FOLDER``, the open_clip model
    config when it is not next to the weights). ``hf-hub:org/name[@rev]`` and ``ARCH:TAG`` resolve through the
    caches; anything else -> None (a local file / folder / ``local-dir:``, used as is by the caller)."""
    arch, tag = split_open_clip_name(value)
    if arch.startswith("hf-hub:"):
        return _resolve_hf_hub(arch[len("hf-hub:"):], where).model_name, None
    if tag is not None and not Path(value).exists():
        import open_clip
        from open_clip.pretrained import get_pretrained_cfg

        weights = _resolve_tag(arch, tag, where).weights
        model_cfg = dict(open_clip.get_model_config(arch) or {})
        tag_cfg = get_pretrained_cfg(arch, tag)  # what the tag says beside the weights (as open_clip applies it)
        model_cfg["quick_gelu"] = bool(model_cfg.get("quick_gelu") or tag_cfg.get("quick_gelu"))
        model_cfg["preprocess_cfg"] = {k: tag_cfg[k] for k in ("mean", "std") if tag_cfg.get(k) is not None}
        return weights, model_cfg
    return None


def init_image_tower(model, value: str, where: str = "model.image.pretrained") -> list[str]:
    """Load open_clip weights into ``model.towers["image"]`` (+ ``proj["image"]`` when embed_dim matches).

    ``value``: ``ARCH:TAG``, ``hf-hub:org/name[@rev]``, ``local-dir:DIR`` or a weights file (with its open_clip config
    next to it). Strict: the checkpoint's vision tower must match ``model.image`` (sizes, heads)."""
    from mlmm.hub.interop_open_clip import is_open_clip_source, load_open_clip_into

    source, model_cfg = open_clip_weights(value, where) or (value, None)
    if not is_open_clip_source(source):
        raise FileNotFoundError(f"{where}: {value}: not an open_clip source (ARCH:TAG such as "
                                "ViT-B-32:laion2b_s34b_b79k, hf-hub:org/name, local-dir:DIR or a weights file)")
    try:
        return load_open_clip_into(model, source, towers=("image",), model_cfg=model_cfg)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
