"""Per-language word lists and caption edits: drop / insert / swap an attribute or object word; concept extraction.

    lists = load_word_lists("package:mlmm/data/wordlists/shapes.yaml")      # or a dict of the same layout
    editor = CaptionEditor(lists)
    editor.edit("a big red circle", "en", "swap", rng)          # -> "a big blue circle"     (hard negative)
    editor.edit("a red circle", "en", "insert", rng, forbid={"big"})   # -> "a small red circle" (text says more)
    editor.edit("a big red circle", "en", "drop", rng)          # -> "a red circle"          (text says less)
    editor.concepts("ein großer roter Kreis", "de")             # -> ["big", "red", "circle"]

The YAML layout is documented in ``mlmm/data/wordlists/shapes.yaml``. ``forbid`` holds concepts that must not be
introduced (e.g. the sample's ``labels``: inserting or swapping in an attribute the image does have would not make a
negative). Used by the ASCL head (edits of each training caption) and the MVSEN head (multi-label targets).
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

EDIT_KINDS = ("drop", "insert", "swap")
_STRIP = string.punctuation + "«»„“”’"
ANY_TAG = ""


@dataclass(frozen=True)
class Word:
    """One word-list entry: surface form, concept, category, agreement tag and kind (attribute | object)."""

    form: str
    concept: str
    category: str
    tag: str
    kind: str


def _entries(value: Any, where: str) -> dict[str, dict[str, str]]:
    """A category value -> {tag: {word: concept}} (tag "" = no agreement)."""
    if isinstance(value, list):
        return {ANY_TAG: {str(w): str(w) for w in value}}
    if isinstance(value, dict) and value and all(isinstance(v, (dict, list)) for v in value.values()):
        return {str(tag): _entries(v, f"{where}.{tag}")[ANY_TAG] for tag, v in value.items()}
    if isinstance(value, dict) and all(isinstance(v, str) for v in value.values()):
        return {ANY_TAG: {str(w): str(c) for w, c in value.items()}}
    raise ValueError(f"{where}: expected a list of words, a mapping word -> concept, or tag -> (list | mapping)")


DEFAULT_WORD_LIST = "package:mlmm/data/wordlists/shapes.yaml"


def resolve_words(cfg, where: str) -> None:
    """Fill a head config's ``words`` from its ``word_list`` (kept inline so that exports do not depend on the file);
    ConfigError naming ``where.words`` / ``where.word_list`` when it does not load."""
    from mlmm.config import ConfigError

    try:
        cfg.words = load_word_lists(cfg.words if cfg.words else cfg.word_list)
    except (OSError, ValueError) as e:
        key = "words" if cfg.words else "word_list"
        raise ConfigError(f"{where}.{key}: {e}") from None


def load_word_lists(source: str | Path | dict) -> dict[str, dict]:
    """Read and check a word-list YAML (path, ``package:...`` path) or mapping -> plain dict ``{lang: {...}}``."""
    where = "word lists"
    if not isinstance(source, dict):
        from mlmm.config_paths import resolve_package_path

        path = Path(resolve_package_path(str(source), "word_list"))
        if not path.is_file():
            raise FileNotFoundError(f"word list {source!r}: {path} not found")
        where = str(path)
        source = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(source, dict) or not source:
        raise ValueError(f"{where}: expected a mapping language -> {{attributes, objects}}")
    for lang, section in source.items():
        if not isinstance(section, dict):
            raise ValueError(f"{where}: {lang}: expected a mapping with 'attributes' / 'objects'")
        unknown = set(section) - {"attributes", "objects", "insert_after_object"}
        if unknown:
            raise ValueError(f"{where}: {lang}: unknown keys {sorted(unknown)}")
        for kind in ("attributes", "objects"):
            for cat, value in (section.get(kind) or {}).items():
                _entries(value, f"{where}: {lang}.{kind}.{cat}")
        after = set(section.get("insert_after_object") or [])
        if not after <= set(section.get("attributes") or {}):
            raise ValueError(f"{where}: {lang}.insert_after_object: {sorted(after)} are not attribute categories")
    return source


def _norm(token: str) -> str:
    return token.strip(_STRIP).lower()


class CaptionEditor:
    """Applies word-list edits to captions of every language the lists cover."""

    def __init__(self, lists: dict):
        lists = load_word_lists(lists)
        self.languages = sorted(lists)
        self.lookup: dict[str, dict[str, Word]] = {}  # lang -> normalised form -> Word
        self.groups: dict[tuple[str, str, str, str], list[Word]] = {}  # (lang, kind, category, tag) -> words
        self.after: dict[str, set[str]] = {}
        for lang, section in lists.items():
            table: dict[str, Word] = {}
            for kind, key in (("attribute", "attributes"), ("object", "objects")):
                for cat, value in (section.get(key) or {}).items():
                    for tag, words in _entries(value, f"{lang}.{key}.{cat}").items():
                        group = [Word(w, c, cat, tag, kind) for w, c in words.items()]
                        self.groups[(lang, kind, cat, tag)] = group
                        for w in group:
                            table.setdefault(_norm(w.form), w)
            self.lookup[lang] = table
            self.after[lang] = set(section.get("insert_after_object") or [])

    def analyse(self, caption: str, lang: str) -> list[tuple[int, Word]]:
        """(token index, Word) for every token of ``caption`` found in the language's lists."""
        table = self.lookup.get(lang, {})
        return [(i, table[_norm(t)]) for i, t in enumerate(caption.split()) if _norm(t) in table]

    def concepts(self, caption: str, lang: str, kinds: Iterable[str] = ("attribute", "object")) -> list[str]:
        """Concepts named in the caption, in order of appearance (no duplicates)."""
        out: list[str] = []
        for _, w in self.analyse(caption, lang):
            if w.kind in kinds and w.concept not in out:
                out.append(w.concept)
        return out

    def all_concepts(self) -> list[str]:
        return sorted({w.concept for g in self.groups.values() for w in g})

    def edit(self, caption: str, lang: str, kind: str, rng: random.Random, *, targets: Iterable[str] = ("attribute",),
             forbid: Iterable[str] = ()) -> Optional[str]:
        """One random edit of ``kind`` (drop | insert | swap) on a word of ``targets`` kinds; ``None`` if impossible.

        drop: remove one word; insert: add an attribute of a category the caption does not name (agreeing with
        its neighbour); swap: replace a word by another of its (category, tag) with a different concept. Concepts
        in ``forbid`` are never introduced.
        """
        if kind not in EDIT_KINDS:
            raise ValueError(f"edit kind must be one of {EDIT_KINDS}, got {kind!r}")
        if lang not in self.lookup:
            return None
        tokens, found = caption.split(), self.analyse(caption, lang)
        forbid, targets = set(forbid), tuple(targets)
        if kind == "drop":
            # never drop the only content word
            cand = [(i, w) for i, w in found if w.kind in targets] if len(found) > 1 else []
            if not cand:
                return None
            i, _ = rng.choice(cand)
            core = tokens[i].strip(_STRIP)
            tail = tokens[i][tokens[i].find(core) + len(core):] if core else ""  # "blanche." -> "."
            kept = tokens[:i] + tokens[i + 1:]
            if tail and i > 0:
                kept[i - 1] += tail
            return " ".join(kept)
        if kind == "swap":  # a word uniformly among the swappable ones, then one of its alternatives
            options = []
            for i, w in found:
                if w.kind in targets:
                    alts = [a for a in self.groups[(lang, w.kind, w.category, w.tag)]
                            if a.concept != w.concept and a.concept not in forbid]
                    if alts:
                        options.append((i, alts))
            if not options:
                return None
            i, alts = rng.choice(options)
            return " ".join(tokens[:i] + [_match_case(tokens[i], rng.choice(alts).form)] + tokens[i + 1:])
        return self._insert(tokens, found, lang, rng, forbid)

    def _insert(self, tokens: list[str], found: list[tuple[int, Word]], lang: str, rng: random.Random,
                forbid: set[str]) -> Optional[str]:
        objects = [(i, w) for i, w in found if w.kind == "object"]
        if not objects:
            return None
        at = dict(found)
        obj_i, obj = rng.choice(objects)
        present = {w.category for w in at.values() if w.kind == "attribute"}
        options = []
        for (lg, kind, cat, tag), words in self.groups.items():
            if lg != lang or kind != "attribute" or cat in present:
                continue
            after = cat in self.after[lang]
            # the run of attribute words on the insertion side of the object word
            step = 1 if after else -1
            j = obj_i + step
            while j in at and at[j].kind == "attribute":
                j += step
            neighbour = at.get(obj_i + step) if (obj_i + step) in at and at[obj_i + step].kind == "attribute" else None
            want = neighbour.tag if neighbour is not None else obj.tag
            if tag not in (want, ANY_TAG):
                continue
            pos = j if after else j + 1  # after: past the run; before: at the start of the run
            options += [(pos, w) for w in words if w.concept not in forbid]
        if not options:
            return None
        pos, w = rng.choice(options)
        return " ".join(tokens[:pos] + [w.form] + tokens[pos:])


def _match_case(old: str, new: str) -> str:
    """Keep surrounding punctuation of the replaced token."""
    core = old.strip(_STRIP)
    start = old.find(core) if core else 0
    return old[:start] + new + old[start + len(core):]
