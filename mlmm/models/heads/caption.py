"""Caption decoder: a causal transformer decoder cross-attending to image / video tokens, with a language token
prefix so that one model captions in several languages; teacher forcing for training, greedy and beam search.

    model.heads: {caption: {name: caption, media: image, width: 64, layers: 2, heads: 4, languages: [en, de, vi]}}

Sequence layout (the text tower's tokenizer, which wraps texts as ``BOS w1 .. wn EOS``): the decoder reads
``<lang> w1 .. wn`` (the BOS position carries the learned embedding of the caption's language) and predicts
``w1 .. wn EOS``. Outputs ``caption_logits`` [B, L-1, V], ``caption_targets`` Long[B, L-1] and
``caption_target_mask`` Bool[B, L-1] (real target tokens of rows with a caption in a known language and the media).
The output projection is tied to the token embedding.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlmm.config import ConfigError
from mlmm.contracts import token_keys
from mlmm.models.fusion.cross_attention import CrossAttentionFusion
from mlmm.registry import HEADS


@dataclass
class CaptionHeadConfig:
    media: str = "image"  # image | video
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    languages: list[str] = field(default_factory=lambda: ["en"])  # language-prefix tokens
    max_length: int = 32  # decoder positions (BOS/lang + words + EOS)
    RANGES: ClassVar[dict] = {"width": ">= 1", "layers": ">= 1", "heads": ">= 1", "mlp_ratio": "> 0",
                              "max_length": ">= 2"}
    name: str = field(default="caption", init=False)

    def validate(self, where: str) -> None:
        if self.media not in ("image", "video"):
            raise ConfigError(f"{where}.media: must be image or video, got {self.media!r}")
        if self.width % self.heads:
            raise ConfigError(f"{where}.heads: {self.heads} does not divide width {self.width}")
        if not self.languages:
            raise ConfigError(f"{where}.languages: at least one language")


def _special(tokenizer, *names) -> Optional[int]:
    for n in names:
        v = getattr(tokenizer, n, None)
        if v is not None:
            return int(v)
    return None


@HEADS.register("caption", config=CaptionHeadConfig)
class CaptionHead(nn.Module):
    @staticmethod
    def reads(cfg: CaptionHeadConfig, model) -> set[str]:
        return token_keys(cfg.media)  # (and the batch's caption ids, with the model's tokenizer)

    @staticmethod
    def writes(cfg: CaptionHeadConfig, model) -> set[str]:
        return {"caption_logits", "caption_targets", "caption_target_mask"}

    def __init__(self, cfg: CaptionHeadConfig, model):
        super().__init__()
        tok = model.tokenizer
        if tok is None:
            raise ConfigError("model.heads.caption: needs the text tokenizer (model.text)")
        self.cfg = cfg
        self.bos_id = _special(tok, "cls_token_id", "bos_token_id")
        self.eos_id = _special(tok, "sep_token_id", "eos_token_id")
        self.pad_id = _special(tok, "pad_token_id") or 0
        if self.eos_id is None:
            raise ConfigError("model.heads.caption: the tokenizer has no EOS/SEP token")
        self.banned = sorted({i for i in (self.bos_id, self.pad_id, _special(tok, "unk_token_id"),
                                          _special(tok, "mask_token_id")) if i is not None and i != self.eos_id})
        self.lang_index = {lang: i for i, lang in enumerate(cfg.languages)}
        vocab = len(tok)
        self.tok_emb = nn.Embedding(vocab, cfg.width)
        self.lang_emb = nn.Embedding(len(cfg.languages), cfg.width)
        self.pos_emb = nn.Parameter(torch.zeros(cfg.max_length, cfg.width))
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.lang_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb, std=0.01)
        self.decoder = CrossAttentionFusion(cfg.width, cfg.layers, cfg.heads, context_dim=model.widths[cfg.media],
                                            mlp_ratio=cfg.mlp_ratio, causal=True)
        self.out_bias = nn.Parameter(torch.zeros(vocab))

    # ------------------------------------------------------------------------------------ core
    def decode(self, lang_ids: torch.Tensor, words: torch.Tensor, word_mask: Optional[torch.Tensor],
               ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        """lang_ids Long[B], words Long[B, n] (after the prefix), ctx [B, T, D] -> logits [B, 1 + n, V]."""
        x = torch.cat([self.lang_emb(lang_ids)[:, None], self.tok_emb(words)], dim=1)  # [B, 1 + n, W]
        if x.shape[1] > self.cfg.max_length:
            raise ValueError(f"caption: sequence of {x.shape[1]} > max_length {self.cfg.max_length}")
        x = x + self.pos_emb[: x.shape[1]]
        qmask = None
        if word_mask is not None:
            qmask = torch.cat([torch.ones_like(word_mask[:, :1]), word_mask], 1).bool()
        h = self.decoder(x, ctx, query_mask=qmask, context_mask=ctx_mask)  # [B, 1 + n, W]
        return F.linear(h, self.tok_emb.weight, self.out_bias)  # [B, 1 + n, V]

    def lang_ids(self, langs: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        known = torch.tensor([lang in self.lang_index for lang in langs], dtype=torch.bool, device=device)
        ids = torch.tensor([self.lang_index.get(lang, 0) for lang in langs], dtype=torch.long, device=device)
        return ids, known

    def forward(self, outputs: dict, batch, model) -> dict:
        m = self.cfg.media
        ctx, ctx_mask = outputs[f"{m}_tokens"], outputs[f"{m}_token_mask"]
        ids, att = batch.text_ids.to(ctx.device), batch.text_attention.to(ctx.device).bool()
        L = min(ids.shape[1], self.cfg.max_length)
        ids, att = ids[:, :L], att[:, :L]
        langs, known = self.lang_ids(batch.lang, ctx.device)
        logits = self.decode(langs, ids[:, 1:-1], att[:, 1:-1], ctx, ctx_mask)  # [B, L-1, V]
        rows = known & ctx_mask.any(1) & batch.mask("text").to(ctx.device)
        return {"caption_logits": logits, "caption_targets": ids[:, 1:],
                "caption_target_mask": att[:, 1:] & rows[:, None]}

    # ------------------------------------------------------------------------------ inference
    def _step_logprobs(self, langs, words, ctx, ctx_mask) -> torch.Tensor:
        logits = self.decode(langs, words, None, ctx, ctx_mask)[:, -1].float()  # [N, V]
        logits[:, self.banned] = float("-inf")
        return logits.log_softmax(-1)

    @torch.no_grad()
    def generate(self, ctx: torch.Tensor, ctx_mask: torch.Tensor, langs: Sequence[str], *, method: str = "beam",
                 beam_size: int = 3, max_new_tokens: Optional[int] = None, length_penalty: float = 1.0
                 ) -> list[list[int]]:
        """Token ids (without EOS) per row. ``method`` greedy | beam (HF-style early stopping: a row is done when it
        has ``beam_size`` finished hypotheses; hypotheses ranked by ``sum log p / len ** length_penalty``)."""
        unknown = sorted({lang for lang in langs if lang not in self.lang_index})
        if unknown:
            raise ValueError(f"caption: languages {unknown} not in the decoder's languages {list(self.lang_index)}")
        max_new = min(max_new_tokens or self.cfg.max_length - 1, self.cfg.max_length - 1)
        lang_ids, _ = self.lang_ids(langs, ctx.device)
        if method == "greedy":
            return self._greedy(lang_ids, ctx, ctx_mask, max_new)
        if method == "beam":
            return self._beam(lang_ids, ctx, ctx_mask, max_new, beam_size, length_penalty)
        raise ValueError(f"caption: method must be greedy or beam, got {method!r}")

    def _greedy(self, lang_ids, ctx, ctx_mask, max_new) -> list[list[int]]:
        B = ctx.shape[0]
        words = torch.zeros(B, 0, dtype=torch.long, device=ctx.device)
        done = torch.zeros(B, dtype=torch.bool, device=ctx.device)
        for _ in range(max_new):
            nxt = self._step_logprobs(lang_ids, words, ctx, ctx_mask).argmax(-1)  # [B]
            nxt = torch.where(done, torch.full_like(nxt, self.eos_id), nxt)
            words = torch.cat([words, nxt[:, None]], 1)
            done |= nxt == self.eos_id
            if bool(done.all()):
                break
        out = []
        for row in words.tolist():
            out.append(row[: row.index(self.eos_id)] if self.eos_id in row else row)
        return out

    def _beam(self, lang_ids, ctx, ctx_mask, max_new, K, alpha) -> list[list[int]]:
        B, device = ctx.shape[0], ctx.device
        ctx_k = ctx.repeat_interleave(K, 0)  # [B*K, T, D]
        mask_k = ctx_mask.repeat_interleave(K, 0)
        lang_k = lang_ids.repeat_interleave(K, 0)
        words = torch.zeros(B * K, 0, dtype=torch.long, device=device)
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0  # only the first beam is alive at the start
        finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
        done = [False] * B
        for _ in range(max_new):
            logp = self._step_logprobs(lang_k, words, ctx_k, mask_k)  # [B*K, V]
            V = logp.shape[1]
            cand = (scores.view(B * K, 1) + logp).view(B, K * V)
            top_s, top_i = cand.topk(2 * K, dim=1)  # [B, 2K]
            new_words, new_scores = [], []
            for b in range(B):
                beams: list[tuple[float, int, int]] = []  # (score, source beam, token)
                if not done[b]:
                    for s, i in zip(top_s[b].tolist(), top_i[b].tolist()):
                        if s == float("-inf"):
                            break
                        src, tok = divmod(i, V)
                        if tok == self.eos_id:
                            hyp = words[b * K + src].tolist()
                            finished[b].append((s / max(len(hyp) + 1, 1) ** alpha, hyp))
                        else:
                            beams.append((s, src, tok))
                        if len(beams) == K:
                            break
                    if len(finished[b]) >= K:
                        done[b] = True
                while len(beams) < K:  # done rows / exhausted candidates: dead beams
                    beams.append((float("-inf"), 0, self.eos_id))
                for s, src, tok in beams:
                    new_words.append(torch.cat([words[b * K + src], torch.tensor([tok], device=device)]))
                    new_scores.append(s)
            words = torch.stack(new_words)
            scores = torch.tensor(new_scores, device=device).view(B, K)
            if all(done):
                break
        out = []
        for b in range(B):
            hyps = list(finished[b])
            if not done[b]:  # ran out of length: alive beams count as finished
                for k in range(K):
                    s = float(scores[b, k])
                    if s > float("-inf"):
                        hyp = words[b * K + k].tolist()
                        hyps.append((s / max(len(hyp), 1) ** alpha, hyp))
            best = max(hyps, key=lambda h: h[0])[1] if hyps else []
            out.append(best)
        return out
