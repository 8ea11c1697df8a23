"""Text tower: a Hugging Face encoder (BERT, XLM-R, ...) with mean, CLS or GPO pooling."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mlmm.config import TextTowerConfig

# model types whose position ids start at pad_token_id + 1 (RoBERTa-style), so they need
# max_length + pad_token_id + 1 position embeddings
_PAD_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text"}


def _without_pooler(build: Callable[..., nn.Module], *args: Any, **kwargs: Any) -> nn.Module:
    """BERT-like models take ``add_pooling_layer``; others (DistilBERT, ...) reject it."""
    try:
        return build(*args, add_pooling_layer=False, **kwargs)
    except TypeError as e:
        if "add_pooling_layer" not in str(e):
            raise
        return build(*args, **kwargs)


def pool_text(h: torch.Tensor, attention: torch.Tensor, pooling: str, gpo=None) -> torch.Tensor:
    """tokens [B, L, D], attention [B, L] (1 = real token) -> [B, D]: ``mean`` over the real tokens, ``cls`` (first
    token) or ``gpo`` (the tower's :class:`~mlmm.models.pooling.GPO`)."""
    if pooling == "cls":
        return h[:, 0]
    if pooling == "gpo":
        return gpo(h, attention.bool())
    m = attention.to(h.dtype).unsqueeze(-1)  # [B, L, 1]
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class TextTower(nn.Module):
    """Token ids Long[B, L] + attention Long/Bool[B, L] (1 = real token) -> [B, hidden].

    ``cfg.pretrained`` (a folder or a Hub id, :func:`mlmm.hub.pretrained.load_hf`) loads
    ``AutoModel.from_pretrained``; otherwise a randomly initialised
    ``cfg.arch`` encoder is built from the size fields. The HF pooler (unused, and it would leave
    parameters without gradients) is dropped.
    """

    def __init__(self, cfg: TextTowerConfig, vocab_size: int, pad_token_id: int):
        from transformers import AutoConfig, AutoModel  # imported here: `import mlmm.models` stays light

        super().__init__()
        self.cfg = cfg
        if cfg.pretrained:  # a local folder or a Hub id (org/name[@revision]) through the HF cache
            from mlmm.hub.pretrained import load_hf

            self.model = _without_pooler(lambda **kw: load_hf(AutoModel.from_pretrained, cfg.pretrained,
                                                              "model.text.pretrained", **kw))
        elif cfg.hf_config:  # an exported pretrained tower: same architecture, weights come from the export
            config = AutoConfig.for_model(**cfg.hf_config)
            self.model = _without_pooler(AutoModel.from_config, config, attn_implementation="sdpa")
        else:
            margin = pad_token_id + 1 if cfg.arch in _PAD_OFFSET_POSITIONS else 0
            config = AutoConfig.for_model(
                cfg.arch, vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.layers,
                num_attention_heads=cfg.heads, intermediate_size=cfg.intermediate,
                max_position_embeddings=cfg.max_length + margin + 2, pad_token_id=pad_token_id)
            self.model = _without_pooler(AutoModel.from_config, config, attn_implementation="sdpa")
        n_emb = self.model.get_input_embeddings().num_embeddings
        if vocab_size > n_emb and not (cfg.pretrained and cfg.extend_vocab):  # extend_vocab: the model resizes
            raise ValueError(f"text: tokenizer has {vocab_size} tokens but {cfg.pretrained} embeds only {n_emb}")
        if getattr(self.model, "pooler", None) is not None:  # a model type without add_pooling_layer
            self.model.pooler = None
        self.width: int = self.model.config.hidden_size
        if cfg.pooling == "gpo":
            from mlmm.models.pooling import GPO

            self.gpo = GPO()
        self.train()  # from_pretrained returns eval(); keep the usual nn.Module default

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The HF encoder's own activation checkpointing (non-reentrant ``torch.utils.checkpoint`` per layer)."""
        m, kwargs = self.model, {"use_reentrant": False}
        if hasattr(m, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
            m.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs) if enable else \
                m.activation_checkpointing_disable()
        elif enable:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            m.gradient_checkpointing_disable()

    def forward_tokens(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """ids [B, L], attention [B, L] -> last hidden states [B, L, D] (pad positions included)."""
        return self.model(input_ids=ids, attention_mask=attention).last_hidden_state

    def pool(self, h: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """tokens [B, L, D], attention [B, L] -> [B, D] (masked mean over real tokens, CLS, or GPO)."""
        return pool_text(h, attention, self.cfg.pooling, getattr(self, "gpo", None))

    def forward(self, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        """ids [B, L], attention [B, L] -> pooled [B, D]."""
        return self.pool(self.forward_tokens(ids, attention), attention)
