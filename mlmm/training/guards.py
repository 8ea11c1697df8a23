"""Early, clear failures for mistakes that otherwise surface as a silently bad run or a cryptic crash.

* :class:`LanguageCoverage` — a language whose captions the tokenizer cannot represent (mostly
  ``[UNK]``) is caught on the first batches that carry it, naming the language and the tokenizer.
* :func:`out_of_memory_error` — a CUDA out-of-memory error re-raised with the batch size to lower.
"""
from __future__ import annotations

from collections import defaultdict

import torch


class LanguageCoverage:
    """Per-language share of ``[UNK]`` tokens over the first `min_tokens` text tokens of each language.

    A language is *unsupported* when more than `max_unk` of its tokens are unknown: the text tower
    would learn from a constant. Byte-level tokenizers (no unk token) always pass.
    """

    def __init__(self, tokenizer, tokenizer_name: str, max_unk: float = 0.5, min_tokens: int = 50):
        self.unk_id = getattr(tokenizer, "unk_token_id", None)
        self.unk_token = getattr(tokenizer, "unk_token", None) or "unknown"
        self.special = set(getattr(tokenizer, "all_special_ids", [])) - {self.unk_id}
        self.name, self.max_unk, self.min_tokens = tokenizer_name, max_unk, min_tokens
        self.tokens: dict[str, int] = defaultdict(int)
        self.unks: dict[str, int] = defaultdict(int)
        self.done: set[str] = set()

    def check(self, batch) -> None:
        """Count the batch's tokens per language; raise ValueError for an unsupported language."""
        if self.unk_id is None or batch.text_ids is None or not batch.lang:
            return
        ids = batch.text_ids.cpu()  # [B, L]
        real = batch.text_attention.cpu().bool() if batch.text_attention is not None else torch.ones_like(ids).bool()
        for special in self.special:
            real &= ids != special
        for row, lang in enumerate(batch.lang):
            if not lang or lang in self.done:
                continue
            self.tokens[lang] += int(real[row].sum())
            self.unks[lang] += int((real[row] & (ids[row] == self.unk_id)).sum())
            if self.tokens[lang] >= self.min_tokens:
                self.done.add(lang)
                share = self.unks[lang] / self.tokens[lang]
                if share > self.max_unk:
                    raise ValueError(
                        f"language {lang!r} is not supported by the tokenizer {self.name}: {share:.0%} of its first "
                        f"{self.tokens[lang]} tokens are {self.unk_token} (e.g. caption "
                        f"{batch.captions[row]!r}). Train a tokenizer that covers it (python -m "
                        f"mlmm.data.tokenization --manifest ... or tokenizers/train_sentencepiece.py), or leave it "
                        f"out with data.languages=[...]")


def out_of_memory_error(err: BaseException, *, step: int, batch_size: int, world: int) -> RuntimeError:
    """A RuntimeError that says which batch size to lower (chained to the original OOM)."""
    smaller = max(batch_size // 2, 1)
    return RuntimeError(
        f"out of memory at step {step} with data.batch_size={batch_size} per process ({batch_size * world} global "
        f"over {world} process(es)). Lower data.batch_size (e.g. data.batch_size={smaller}), or cut activation "
        f"memory: a higher train.zero_stage, bf16 in the DeepSpeed config, fewer video frames / a shorter "
        f"model.text.max_length. Original error: {str(err).splitlines()[0] if str(err) else type(err).__name__}")
