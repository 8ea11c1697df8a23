"""Zero-shot class names and prompt templates, per language, from YAML files users can extend.

    prompts = load_prompts(["my_prompts.yaml"])             # the packaged zeroshot.yaml, then yours on top
    classes = class_set("fsdd", prompts)                     # a dataset name, a classes YAML path or a shard folder
    classes.names["de"], classes.templates_for("audio", "de", prompts)

Schema (both the packaged ``mlmm/evaluation/zeroshot.yaml`` and user files)::

    templates: {<modality>: {<lang>: ["a photo of a {c}.", ...]}}
    datasets:
      <name>:
        modality: image | video | audio      # optional: the modality the task embeds (default: image)
        label_key: label                     # the sample json field holding the class (index, or id from `ids`)
        ids: [...]                           # optional class ids matched by string labels (default: classes.en)
        classes: {<lang>: [name of class 0, name of class 1, ...]}
        templates: {<modality>: {<lang>: [...]}}   # optional, replaces the general templates for this dataset

A later file replaces earlier templates per (modality, language) and datasets by name. ``<shards>/classes.yaml``
(written by the classification builders) is one ``datasets`` entry without the name.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

CLASSES_FILE = "classes.yaml"


def _read(path: Path | Any) -> dict:
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) if isinstance(path, (str, Path)) \
            else yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: unreadable prompts YAML ({str(e).splitlines()[0]})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping with `templates` and/or `datasets`")
    return raw or {}


def _check_lists(where: str, table: Any, placeholder: bool) -> dict[str, list[str]]:
    if not isinstance(table, dict):
        raise ValueError(f"{where}: expected a mapping language -> list of strings")
    for lang, items in table.items():
        if not isinstance(items, list) or not items or not all(isinstance(x, str) and x for x in items):
            raise ValueError(f"{where}.{lang}: expected a non-empty list of strings (quote YAML words like null, yes)")
        if placeholder and not all("{c}" in x for x in items):
            raise ValueError(f"{where}.{lang}: every template needs the class placeholder {{c}}")
    return {str(k): list(v) for k, v in table.items()}


def load_prompts(extra: Sequence[str | Path] = ()) -> dict:
    """The packaged prompts merged with ``extra`` YAML files (later wins); every entry validated."""
    sources = [resources.files("mlmm.evaluation") / "zeroshot.yaml", *[Path(p) for p in extra]]
    out: dict = {"templates": {}, "datasets": {}}
    for src in sources:
        raw = _read(src)
        unknown = set(raw) - {"templates", "datasets"}
        if unknown:
            raise ValueError(f"{src}: unknown keys {sorted(unknown)} (expected templates, datasets)")
        for modality, table in (raw.get("templates") or {}).items():
            out["templates"].setdefault(modality, {}).update(
                _check_lists(f"{src}: templates.{modality}", table, placeholder=True))
        for name, entry in (raw.get("datasets") or {}).items():
            out["datasets"][str(name)] = check_entry(entry, f"{src}: datasets.{name}")
    return out


def check_entry(entry: Any, where: str) -> dict:
    if not isinstance(entry, dict) or "classes" not in entry:
        raise ValueError(f"{where}: expected a mapping with `classes: {{lang: [names]}}`")
    unknown = set(entry) - {"modality", "label_key", "ids", "classes", "templates"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    classes = _check_lists(f"{where}.classes", entry["classes"], placeholder=False)
    sizes = {lang: len(v) for lang, v in classes.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"{where}.classes: every language needs the same number of classes, got {sizes}")
    ids = entry.get("ids")
    if ids is not None and (not isinstance(ids, list) or len(ids) != next(iter(sizes.values()))):
        raise ValueError(f"{where}.ids: expected one id per class ({next(iter(sizes.values()))})")
    templates = {m: _check_lists(f"{where}.templates.{m}", t, placeholder=True)
                 for m, t in (entry.get("templates") or {}).items()}
    return {**entry, "classes": classes, "templates": templates}


@dataclass
class ClassSet:
    """A classification label space: class names per language, how samples name their class, own templates."""

    name: str
    names: dict[str, list[str]]
    label_key: str = "label"
    modality: Optional[str] = None
    ids: Optional[list[str]] = None
    templates: dict[str, dict[str, list[str]]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(next(iter(self.names.values())))

    def label(self, meta: dict) -> Optional[int]:
        """The class index of a sample (its ``label_key`` field: an index, or an id), None when it has none."""
        value = meta.get(self.label_key)
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return value if 0 <= value < len(self) else None
        ids = self.ids or self.names.get("en") or next(iter(self.names.values()))
        value = str(value)
        if value.lstrip("-").isdigit() and value not in ids:
            return self.label({self.label_key: int(value)})
        return ids.index(value) if value in ids else None

    def templates_for(self, modality: str, lang: str, prompts: dict) -> Optional[list[str]]:
        """This dataset's templates for (modality, lang), else the general ones; None when neither has any."""
        own = self.templates.get(modality, {})
        return own.get(lang) or prompts["templates"].get(modality, {}).get(lang)


def class_set(spec: str | Path, prompts: dict) -> ClassSet:
    """A dataset name from ``prompts``, a classes YAML file, or a shard folder holding ``classes.yaml``."""
    path = Path(spec)
    if path.is_dir():
        path = path / CLASSES_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (the shard folder has no class names; pass classes=NAME|FILE)")
    if path.is_file():
        entry, name = check_entry(_read(path), str(path)), path.parent.name if path.name == CLASSES_FILE else path.stem
    elif str(spec) in prompts["datasets"]:
        entry, name = prompts["datasets"][str(spec)], str(spec)
    else:
        raise ValueError(f"classes {spec!r}: not a file, a shard folder with {CLASSES_FILE}, or a dataset of the "
                         f"prompts YAML (known: {', '.join(sorted(prompts['datasets'])) or 'none'})")
    return ClassSet(name=name, names=entry["classes"], label_key=str(entry.get("label_key", "label")),
                    modality=entry.get("modality"), ids=[str(i) for i in entry["ids"]] if entry.get("ids") else None,
                    templates=entry.get("templates") or {})


def write_classes(folder: str | Path, names: dict[str, list[str]], *, modality: str = "image",
                  label_key: str = "label", ids: Optional[list[str]] = None) -> Path:
    """Write ``folder/classes.yaml`` (what the classification builders leave beside their shards)."""
    entry: dict[str, Any] = {"modality": modality, "label_key": label_key}
    if ids is not None:
        entry["ids"] = list(ids)
    entry["classes"] = {lang: list(v) for lang, v in names.items()}
    check_entry(entry, str(folder))
    path = Path(folder) / CLASSES_FILE
    path.write_text(yaml.safe_dump(entry, allow_unicode=True, sort_keys=False), encoding="utf-8")
    return path
