"""Where pretrained weights and tokenizers come from: a local path or a Hugging Face Hub id.

    parse_source("runs/x/export")                       # -> Path("runs/x/export")
    parse_source("FacebookAI/xlm-roberta-base")         # -> HubId("FacebookAI/xlm-roberta-base")
    parse_source("FacebookAI/xlm-roberta-base@v1.0")    # -> HubId(..., revision="v1.0")
    parse_source("xlm-roberta-base")                    # -> HubId (unless a folder ./xlm-roberta-base exists)

The ONE decision between "a file or folder on this machine" and "a model on the Hub" for every config key that
names pretrained weights or a tokenizer (``model.text.pretrained``, ``model.text.tokenizer``, ``loss.teacher.*``,
``hf-hub:`` open_clip ids, ``mlmm.hub.from_pretrained``). Load-time checks use it to tell "this local folder is
missing" from "this Hub model is not cached". Pure Python, no network, cheap to import.

Rule: an existing path is local. Otherwise a value that can only be a path (starts with ``/``, ``.``, ``~``,
contains a backslash or more than one ``/``) is local, and missing. Otherwise a value of the Hub grammar
``[org/]name[@revision]`` is a Hub id; anything else is a (missing) local path.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

_REPO = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_REVISION = re.compile(r"^[\w.\-/]+$")


@dataclass(frozen=True)
class HubId:
    """A Hugging Face Hub model id, with an optional revision (branch, tag or commit)."""

    repo_id: str
    revision: Optional[str] = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")

    def fetch_command(self, *files: str, include: Optional[str] = None) -> str:
        """The shell command that puts this model (or only ``files`` / the ``include`` glob) into the HF cache."""
        parts = ["hf", "download", self.repo_id, *files]
        if include:
            parts += ["--include", f"'{include}'"]
        if self.revision:
            parts += ["--revision", self.revision]
        return " ".join(parts)


Source = Union[Path, HubId]


def parse_source(value: str | Path) -> Source:
    """A local path (``Path``, which may not exist) or a :class:`HubId`; see the module docstring for the rule."""
    if isinstance(value, Path):
        return value
    text = str(value).strip()
    path = Path(text).expanduser()
    if path.exists() or not text:
        return path
    if text.startswith(("/", ".", "~")) or "\\" in text:
        return path
    repo, _, revision = text.partition("@")
    if repo.count("/") > 1 or not _REPO.match(repo) or (revision and not _REVISION.match(revision)):
        return path
    if "@" in text and not revision:
        return path
    return HubId(repo, revision or None)


def is_hub_id(value: str | Path) -> bool:
    """True when :func:`parse_source` reads ``value`` as a Hub id (no local file or folder of that name)."""
    return isinstance(parse_source(value), HubId)
