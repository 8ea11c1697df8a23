"""Weighted sum of registered losses, for multi-task recipes.

    loss:
      name: multi
      terms:
        contrastive: {weight: 1.0, pairs: [[image, text]]}
        vqa: {weight: 0.5}
        aux: {name: contrastive, weight: 0.1, pairs: [[audio, video]]}   # instance with an explicit type

Each term is built from its own registered config; its outputs appear prefixed by the instance
name (``vqa/vqa_loss``) except the main ``loss``, which is weighted into the total.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from mlmm.config import ConfigError
from mlmm.data.batch import Batch
from mlmm.ranges import check_value
from mlmm.registry import LOSSES, build_component_config


@dataclass
class MultiLossConfig:
    terms: dict = field(default_factory=dict)  # instance -> {name?: registered loss, weight?: float, ...}
    weights: dict = field(default_factory=dict)  # instance -> weight (filled from terms.<k>.weight)
    RANGES: ClassVar[dict] = {"weights": ">= 0"}
    name: str = field(default="multi", init=False)

    def validate(self, where: str) -> None:
        if not self.terms:
            raise ConfigError(f"{where}.terms: at least one loss term is required")
        built = {}
        for key, raw in self.terms.items():
            if dataclasses.is_dataclass(raw):
                built[key] = raw
                continue
            if not isinstance(raw, dict):
                raise ConfigError(f"{where}.terms.{key}: expected a mapping")
            raw = dict(raw)
            weight = raw.pop("weight", self.weights.get(key, 1.0))
            check_value(weight, self.RANGES["weights"], f"{where}.terms.{key}.weight")
            if raw.get("name", key) == "multi":
                raise ConfigError(f"{where}.terms.{key}: a multi loss cannot nest another")
            cfg = build_component_config(LOSSES, raw, f"{where}.terms.{key}", default_name=key)
            self.weights[key] = float(weight)
            built[key] = cfg
        self.terms = built


@LOSSES.register("multi", config=MultiLossConfig)
class MultiLoss(nn.Module):
    @staticmethod
    def reads(cfg: MultiLossConfig, model) -> set[str]:
        return set().union(*(LOSSES.get(c.name).cls.reads(c, model) for c in cfg.terms.values()))

    def __init__(self, cfg: MultiLossConfig, modalities: list[str]):
        super().__init__()
        self.cfg = cfg
        self.terms = nn.ModuleDict({k: LOSSES.get(c.name).cls(c, modalities) for k, c in cfg.terms.items()})
        self.weights = {k: cfg.weights.get(k, 1.0) for k in cfg.terms}

    def forward(self, outputs: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        total, result = None, {}
        for key, term in self.terms.items():
            out = term(outputs, batch)
            total = out["loss"] * self.weights[key] + (0 if total is None else total)
            result[f"{key}_loss"] = out["loss"]
            result.update({f"{key}/{k}": v for k, v in out.items() if k != "loss"})
        return {"loss": total, **result}

    def temperatures(self) -> dict[str, float]:
        out = {}
        for key, term in self.terms.items():
            if hasattr(term, "temperatures"):
                out.update({f"{key}/{k}": v for k, v in term.temperatures().items()})
        return out
