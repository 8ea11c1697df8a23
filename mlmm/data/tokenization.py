"""Train a small multilingual BPE tokenizer on captions and load it back through transformers.

    tok = train_tokenizer(captions, "runs/tok", vocab_size=1000)
    tok = load_tokenizer("runs/tok")            # = AutoTokenizer.from_pretrained

CLI (trains on every caption of every manifest, see :mod:`mlmm.data.write_shards`)::

    python -m mlmm.data.tokenization --manifest data/manifest.jsonl[,other.jsonl] --out runs/tok --vocab-size 1000

Design: NFKC + lowercase normaliser, Metaspace pre-tokenizer (splits on spaces only, so accented
Latin scripts such as Vietnamese, German and French keep their words whole), BPE with an
``[UNK]`` fallback, special tokens ``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4`` and a
post-processor that wraps every text as ``[CLS] ... [SEP]``. Always reload from the saved folder
(transformers v5 ignores some ``vocab_file=`` constructor arguments).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_tokenizer(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int = 1000, min_frequency: int = 1
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer on ``texts``, save it to ``out_dir`` and return it (ids of specials fixed)."""
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Load a tokenizer folder (ours or any Hugging Face one) with ``AutoTokenizer``."""
    path = Path(path)
    if path.exists() and not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: not a tokenizer folder (no tokenizer.json / tokenizer_config.json)")
    return AutoTokenizer.from_pretrained(str(path))


def manifest_captions(manifest_paths: Iterable[str | Path]) -> Iterator[str]:
    """Every caption (all languages) of every row of the given mlmm manifests."""
    from mlmm.data.write_shards import iter_jsonl

    for path in manifest_paths:
        for _, row in iter_jsonl(path):
            for caps in (row.get("captions") or {}).values():
                for cap in [caps] if isinstance(caps, str) else caps:
                    yield cap


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--manifest", required=True, help="comma-separated mlmm manifest .jsonl files")
    parser.add_argument("--out", required=True, help="output tokenizer folder")
    parser.add_argument("--vocab-size", type=int, default=1000)
    args = parser.parse_args(argv)
    texts = list(manifest_captions([p for p in args.manifest.split(",") if p]))
    tok = train_tokenizer(texts, args.out, vocab_size=args.vocab_size)
    print(f"trained on {len(texts)} captions -> {args.out} (vocab {len(tok)})")


if __name__ == "__main__":
    main()
