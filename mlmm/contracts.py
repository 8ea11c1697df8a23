"""Head <-> loss contracts: which model outputs each registered head and loss reads and writes, checked when a
config loads (:func:`check`, called by :func:`mlmm.config.build_config`), so a loss without the head it needs is a
one-line ConfigError before any model is built, not a KeyError at the first forward pass.

Every head class declares ``reads(cfg, model) -> set[str]`` and ``writes(cfg, model) -> set[str]``, every loss
class ``reads(cfg, model) -> set[str]`` (static methods; ``cfg`` is the component's config, ``model`` the
:class:`~mlmm.config.ModelConfig`). The keys are those of ``MultimodalModel.forward``'s outputs:

* ``<m>``: the embedding [B, E] of each tower ``m`` of the model;
* ``<m>_tokens`` / ``<m>_token_mask``: tower ``m``'s token features, which the model adds when a head reads them;
* whatever the heads write, in ``model.heads`` order (a head may rewrite a key it reads, e.g. the language
  adapter's ``text``; two heads writing one key is an error).

The registries (:mod:`mlmm.registry`) refuse a head or loss class without these methods.
"""
from __future__ import annotations

from typing import Iterator

from mlmm.config import ConfigError
from mlmm.modalities import MODALITIES

TOKEN_SUFFIXES = ("_tokens", "_token_mask")


def token_keys(modality: str) -> set[str]:
    return {modality + s for s in TOKEN_SUFFIXES}


def token_modalities(keys) -> list[str]:
    """The towers whose token features ``keys`` name."""
    return sorted(m for m in MODALITIES if token_keys(m) & set(keys))


def head_reads(cfg, model) -> set[str]:
    from mlmm.registry import HEADS

    return set(HEADS.get(cfg.name).cls.reads(cfg, model))


def head_writes(cfg, model) -> set[str]:
    from mlmm.registry import HEADS

    return set(HEADS.get(cfg.name).cls.writes(cfg, model))


def loss_terms(cfg, where: str = "loss") -> Iterator[tuple[str, object]]:
    """(config path, config) of the loss and, for ``multi``, of each of its terms."""
    terms = getattr(cfg, "terms", None)
    if terms:
        for key, term in terms.items():
            yield f"{where}.terms.{key}", term
    else:
        yield where, cfg


def loss_reads(cfg, model) -> set[str]:
    from mlmm.registry import LOSSES

    return set().union(*(LOSSES.get(c.name).cls.reads(c, model) for _, c in loss_terms(cfg)))


def writers(model) -> dict[str, str]:
    """Output key -> what writes it (``model.<m>`` or ``model.heads.<instance>``) for ``model``'s towers and heads;
    ConfigError when a head reads a key that neither a tower nor an earlier head writes, or writes a key another
    already writes."""
    towers = model.modalities
    out = {m: f"model.{m}" for m in towers}
    tokens = {k: f"model.{m}" for m in towers for k in token_keys(m)}
    read_tokens: set[str] = set()
    for inst, hcfg in model.heads.items():
        where = f"model.heads.{inst}"
        reads = head_reads(hcfg, model)
        missing = sorted(k for k in reads if k not in out and k not in tokens)
        if missing:
            raise ConfigError(f"{where}: the {hcfg.name} head reads {missing[0]}, which {_nothing_writes(missing[0])}")
        read_tokens |= reads & tokens.keys()
        for k in sorted(head_writes(hcfg, model)):
            if k in out and k not in reads:
                raise ConfigError(f"{where}: the {hcfg.name} head writes {k}, which {out[k]} already writes")
            out[k] = where
    return {**out, **{k: tokens[k] for k in read_tokens}}


def check(cfg) -> None:
    """One-line ConfigError naming the first head or loss that reads an output nothing writes (see module doc)."""
    available = writers(cfg.model)
    for where, lcfg in loss_terms(cfg.loss):
        from mlmm.registry import LOSSES

        missing = sorted(k for k in LOSSES.get(lcfg.name).cls.reads(lcfg, cfg.model) if k not in available)
        if missing:
            raise ConfigError(f"{where}: the {lcfg.name} loss reads {missing[0]}, which {_nothing_writes(missing[0])}")


def _nothing_writes(key: str) -> str:
    """The end of an error sentence: what would provide ``key``."""
    for m in MODALITIES:
        if key == m or key in token_keys(m):
            return f"only {'an' if m[0] in 'aeiou' else 'a'} {m} tower provides; add model.{m}"
    from mlmm.registry import HEADS

    for name in HEADS.names():
        entry = HEADS.get(name)
        try:
            writes = entry.cls.writes(entry.config(), None)
        except Exception:  # noqa: BLE001 - a head whose keys depend on a required setting: not a hint
            continue
        if key in writes:
            return f"no tower or head of the model writes; add a {name} head (model.heads.<name>: {{name: {name}}})"
    return "no tower or head of the model writes"
