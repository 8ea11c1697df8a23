"""Name -> class registries for the parts a config can name (losses, towers, fusion modules).

    @LOSSES.register("contrastive", config=ContrastiveLossConfig)
    class ContrastiveLoss(nn.Module): ...

A config selects a component by name (``loss: {name: contrastive, ...}``); the trainer never
branches on method names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional


@dataclass(frozen=True)
class Entry:
    name: str
    cls: type
    config: Optional[type]  # dataclass validated from the YAML section, or None


class Registry:
    def __init__(self, kind: str, modules: tuple[str, ...] = (), contract: tuple[str, ...] = ()):
        self.kind = kind
        self._entries: dict[str, Entry] = {}
        self._modules = modules  # imported on first lookup so that registration has happened
        self._contract = contract  # static methods every registered class defines (mlmm.contracts)

    def register(self, name: str, config: Optional[type] = None) -> Callable[[type], type]:
        def wrap(cls: type) -> type:
            if name in self._entries and self._entries[name].cls is not cls:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            missing = [m for m in self._contract if not callable(getattr(cls, m, None))]
            if missing:
                raise TypeError(f"{self.kind} {name!r} ({cls.__name__}) does not declare {', '.join(missing)}: "
                                "see mlmm.contracts")
            self._entries[name] = Entry(name, cls, config)
            return cls

        return wrap

    def _load(self) -> None:
        import importlib

        for module in self._modules:
            importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str, key: str = "name") -> Entry:
        from mlmm.config import ConfigError

        self._load()
        if name not in self._entries:
            raise ConfigError(f"{key}: unknown {self.kind} {name!r}; registered: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: str, *args: Any, **kwargs: Any) -> Any:
        return self.get(name).cls(*args, **kwargs)


def build_component_config(registry: Registry, raw: Any, where: str, default_name: Optional[str] = None) -> Any:
    """Validate a YAML section ``{name: <registered>, ...fields}`` into the component's config dataclass.

    The chosen name is kept on the result as ``.name`` (a non-init dataclass field of the config).
    """
    from mlmm.config import ConfigError
    from mlmm.typed import from_dict

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    raw = dict(raw)
    name = raw.pop("name", default_name)
    if name is None:
        raise ConfigError(f"{where}.name: required (one of {', '.join(registry.names())})")
    entry = registry.get(name, key=f"{where}.name")
    cfg = from_dict(entry.config, raw, where)
    cfg.name = name
    return cfg


LOSSES = Registry("loss", modules=("mlmm.losses",), contract=("reads",))
HEADS = Registry("head", modules=("mlmm.models.heads",), contract=("reads", "writes"))
