"""New-language words appended to a pretrained WordPiece vocabulary (``model.text.extend_vocab``).

    tok = extend_tokenizer(tokenizer, VocabExtensionConfig(corpus="train.jsonl", languages=["de", "fr", "cs"]))
    init_new_embeddings(hf_model, tok)        # rows of the new tokens = mean of their old pieces' rows

An English encoder (MiniLM, BERT) splits German, French and Czech words into many short English pieces
("zwei" -> "z ##wei"). :func:`extend_tokenizer` counts the words of ``languages`` in a parallel-caption JSONL
(after the tokenizer's own normaliser and pre-tokenizer: lowercased, accents stripped for uncased BERT) and
appends those the vocabulary lacks, occurring at least ``min_frequency`` times, most frequent first (ties by the
word: deterministic), up to ``max_words``. WordPiece matches the longest vocabulary entry first, so a new word is
read as one token. Words whose addition would change how any ``keep_language`` word of the corpus is split are
left out: the teacher-language side reads exactly the tokens it read before. :func:`init_new_embeddings` resizes
the model's input embeddings and starts each new row at the mean of the rows of the pieces the original vocabulary
split the word into, so the student starts close to where the teacher read the word.
"""
from __future__ import annotations

import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from mlmm.config import ConfigError, VocabExtensionConfig

WHERE = "model.text.extend_vocab"


def word_pieces(word: str, vocab: dict[str, int], prefix: str = "##") -> Optional[list[str]]:
    """Greedy longest-match-first WordPiece split of one pre-tokenized word; None when a piece is missing."""
    out, i = [], 0
    while i < len(word):
        for j in range(len(word), i, -1):
            piece = (prefix if i else "") + word[i:j]
            if piece in vocab:
                out.append(piece)
                i = j
                break
        else:
            return None
    return out


def _corpus_texts(path: Path, languages: list[str]) -> dict[str, list[str]]:
    from mlmm.distill.parallel import read_parallel

    texts: dict[str, list[str]] = {lang: [] for lang in languages}
    for row in read_parallel(path):
        for lang in languages:
            texts[lang] += row["captions"].get(lang, [])
    return texts


def _wordpiece_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    state = json.loads(backend.to_str()) if backend is not None else {}
    if (state.get("model") or {}).get("type") != "WordPiece":
        raise ConfigError(f"{WHERE}: needs a fast WordPiece (BERT-style) tokenizer, got {type(tokenizer).__name__}")
    return state


def new_words(tokenizer, cfg: VocabExtensionConfig) -> list[str]:
    """The words :func:`extend_tokenizer` appends, in order."""
    state = _wordpiece_json(tokenizer)
    vocab, prefix = state["model"]["vocab"], state["model"].get("continuing_subword_prefix", "##")
    backend = tokenizer.backend_tokenizer
    corpus = Path(cfg.corpus)
    if not corpus.is_file():
        raise ConfigError(f"{WHERE}.corpus: {corpus} not found")

    def words(text: str) -> list[str]:
        norm = backend.normalizer.normalize_str(text) if backend.normalizer else text
        return [w for w, _ in backend.pre_tokenizer.pre_tokenize_str(norm)] if backend.pre_tokenizer else norm.split()

    texts = _corpus_texts(corpus, [*cfg.languages, *([cfg.keep_language] if cfg.keep_language else [])])
    counts = Counter(w for lang in cfg.languages for t in texts[lang] for w in words(t))
    ranked = sorted(((n, w) for w, n in counts.items() if n >= cfg.min_frequency and w not in vocab and len(w) > 1),
                    key=lambda x: (-x[0], x[1]))
    chosen = [w for _, w in ranked[:cfg.max_words]]
    if cfg.keep_language:
        kept = {w for t in texts[cfg.keep_language] for w in words(t)}
        extended = {**vocab, **dict.fromkeys(chosen, -1)}
        changed = {p for w in kept for p in (word_pieces(w, extended, prefix) or []) if p not in vocab}
        chosen = [w for w in chosen if w not in changed]
    return chosen


def extend_tokenizer(tokenizer, cfg: VocabExtensionConfig):
    """A copy of ``tokenizer`` whose WordPiece vocabulary ends with :func:`new_words` (ids ``len(tokenizer)`` on)."""
    from transformers import AutoTokenizer

    state = _wordpiece_json(tokenizer)
    vocab = state["model"]["vocab"]
    n_old = len(tokenizer)
    if max(vocab.values()) + 1 != n_old:
        raise ConfigError(f"{WHERE}: the tokenizer has tokens outside its WordPiece vocabulary (added tokens)")
    words = new_words(tokenizer, cfg)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        state["model"]["vocab"] = {**vocab, **{w: n_old + i for i, w in enumerate(words)}}
        (Path(tmp) / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        if (Path(tmp) / "vocab.txt").is_file():  # the slow tokenizer's copy of the vocabulary, kept consistent
            order = sorted(state["model"]["vocab"].items(), key=lambda kv: kv[1])
            (Path(tmp) / "vocab.txt").write_text("".join(t + "\n" for t, _ in order), encoding="utf-8")
        out = AutoTokenizer.from_pretrained(tmp)
    if len(out) != n_old + len(words):
        raise RuntimeError(f"{WHERE}: extended tokenizer has {len(out)} tokens, expected {n_old + len(words)}")
    return out


@torch.no_grad()
def init_new_embeddings(model, tokenizer) -> int:
    """Resize ``model``'s input embeddings to ``len(tokenizer)``; each new row = mean of the rows of the pieces the
    original vocabulary (ids below the old size) splits that token into. Returns the number of new rows."""
    emb = model.get_input_embeddings()
    n_old, n_new = emb.num_embeddings, len(tokenizer)
    if n_new <= n_old:
        return 0
    state = _wordpiece_json(tokenizer)
    prefix = state["model"].get("continuing_subword_prefix", "##")
    old_vocab = {t: i for t, i in state["model"]["vocab"].items() if i < n_old}
    old = emb.weight.detach().clone()  # [n_old, D]
    model.resize_token_embeddings(n_new, mean_resizing=False)
    weight = model.get_input_embeddings().weight  # [n_new, D]
    unk = old_vocab.get(state["model"].get("unk_token", "[UNK]"), 0)
    for i, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(n_old, n_new))), n_old):
        pieces = word_pieces(token, old_vocab, prefix)
        weight[i] = old[[old_vocab[p] for p in pieces] if pieces else [unk]].mean(0)
    return n_new - n_old
