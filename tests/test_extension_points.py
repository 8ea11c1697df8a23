"""Heads and multi-task losses plug in through the registries, without touching the trainer."""
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

from mlmm.config import ConfigError, ModelConfig, build_config
from mlmm.typed import from_dict
from mlmm.data.batch import Batch
from mlmm.models.model import MultimodalModel
from mlmm.registry import HEADS, LOSSES


@dataclass
class ProbeHeadConfig:
    classes: int = 3
    name: str = field(default="probe", init=False)


@HEADS.register("probe", config=ProbeHeadConfig)
class ProbeHead(nn.Module):
    """Classifies images from their patch tokens (reads tokens, returns logits)."""

    @staticmethod
    def reads(cfg, model):
        return {"image_tokens", "image_token_mask"}

    @staticmethod
    def writes(cfg, model):
        return {"probe_logits"}

    def __init__(self, cfg, model):
        super().__init__()
        self.fc = nn.Linear(model.widths["image"], cfg.classes)

    def forward(self, outputs, batch, model):
        tokens, mask = outputs["image_tokens"], outputs["image_token_mask"]  # [B, T, D], [B, T]
        pooled = (tokens * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return {"probe_logits": self.fc(pooled)}


@dataclass
class ProbeLossConfig:
    name: str = field(default="probe_ce", init=False)


@LOSSES.register("probe_ce", config=ProbeLossConfig)
class ProbeLoss(nn.Module):
    @staticmethod
    def reads(cfg, model):
        return {"probe_logits"}

    def __init__(self, cfg, modalities):
        super().__init__()

    def forward(self, outputs, batch):
        labels = torch.tensor([m["label"] for m in batch.meta])
        ce = nn.functional.cross_entropy(outputs["probe_logits"], labels)
        return {"loss": ce, "ce": ce}


def raw_config(**loss):
    return {"data": {"train_shards": "x"},
            "model": {"embed_dim": 8, "image": {}, "text": {"tokenizer": "t"},
                      "heads": {"p": {"name": "probe", "classes": 2}}},
            "loss": loss}


def test_heads_and_multi_loss_from_config_and_gradients():
    cfg = build_config(raw_config(name="multi", terms={"contrastive": {"pairs": [["image", "text"]], "weight": 0.0},
                                                       "probe_ce": {"weight": 2.0}}))
    assert cfg.model.heads["p"].classes == 2 and cfg.loss.weights == {"contrastive": 0.0, "probe_ce": 2.0}
    cfg.model.text = None  # image-only model: the contrastive term is inert without its pair
    model = MultimodalModel(cfg.model)
    B = 4
    batch = Batch(keys=list("abcd"), image=torch.randn(B, 3, 32, 32),
                  image_mask=torch.tensor([True, True, False, True]), meta=[{"label": i % 2} for i in range(B)])
    out = model(batch)
    assert out["image_tokens"].shape == (B, 17, 32) and not out["image_token_mask"][2].any()
    assert torch.all(out["image_tokens"][2] == 0) and out["probe_logits"].shape == (B, 2)
    loss = LOSSES.get("probe_ce").cls(cfg.loss.terms["probe_ce"], model.modalities)
    res = loss(out, batch)
    res["loss"].backward()
    assert model.heads["p"].fc.weight.grad is not None and model.towers["image"].conv1.weight.grad is not None


def test_multi_loss_weights_terms_and_survives_asdict_round_trip():
    import dataclasses

    from mlmm.losses.multi import MultiLossConfig

    cfg = build_config({**raw_config(name="multi", terms={"contrastive": {"pairs": [["image", "text"]]},
                                                          "probe_ce": {"weight": 2.0}}),
                        "model": {"embed_dim": 8, "image": {}, "text": {"tokenizer": "t"},
                                  "heads": {"p": {"name": "probe"}}}})
    again = from_dict(MultiLossConfig, {k: v for k, v in dataclasses.asdict(cfg.loss).items() if k != "name"})
    assert again.weights == cfg.loss.weights and again.terms["contrastive"].pairs == [["image", "text"]]
    assert from_dict(ModelConfig, {**dataclasses.asdict(cfg.model)}).heads["p"].classes == 3


def test_unknown_head_or_term_names_the_key():
    with pytest.raises(ConfigError, match=r"model.heads.p.name: unknown head 'nope'"):
        build_config({"model": {"image": {}, "heads": {"p": {"name": "nope"}}}})
    with pytest.raises(ConfigError, match=r"loss.terms.zzz.name: unknown loss 'zzz'"):
        build_config({"model": {"image": {}}, "loss": {"name": "multi", "terms": {"zzz": {}}}})
    with pytest.raises(ConfigError, match=r"model.heads.p.clases: unknown key"):
        build_config({"model": {"image": {}, "heads": {"p": {"name": "probe", "clases": 2}}}})
