"""Train a multilingual sentencepiece tokenizer with language-balanced sampling; save it as a transformers folder.

    mlmm-sentencepiece --input captions.jsonl --languages en,de,fr,vi --vocab-size 8000 \
        --out tokenizers/assets/mm8k [--model-type unigram|bpe] [--alpha 0.3]

(``python tokenizers/train_sentencepiece.py`` is the same command.)

``--input``: JSONL files (comma list) whose lines hold ``{"captions": {lang: str | [str]}}`` (mlmm manifests,
Multi30K, ...) or plain ``.txt`` files (one sentence per line, language = the file stem's last ``.``-part,
e.g. ``train.de.txt``).

Language balance (XLM-R, Conneau et al. 2020): with n_l sentences of language l and p_l = n_l / sum n,
sample languages with q_l = p_l^alpha / sum_k p_k^alpha (alpha = 0.3 in XLM-R); the training corpus has
``--sentences`` sentences (default: as many as the input), drawn per language with replacement from its
sentences in proportion q_l, so low-resource languages are up-sampled.

Output folder (load with ``transformers.AutoTokenizer.from_pretrained(out)``; transformers v5 ignores
``XLMRobertaTokenizer(vocab_file=...)``, so the sentencepiece model is converted to a ``tokenizers`` pipeline and
saved with ``save_pretrained``): ``tokenizer.json`` (+ config), ``spm.model`` / ``spm.vocab`` (the original),
``fertility.json``. Ids equal sentencepiece's ids: ``<pad>=0 <unk>=1 <s>=2 </s>=3 <mask>=4``; every text is
wrapped as ``<s> ... </s>`` (XLM-R style). Normalisation = sentencepiece's ``nmt_nfkc`` (the precompiled
charsmap), pre-tokenisation = Metaspace. The round trip (HF ids == sentencepiece ids) is tested.

Fertility = subword tokens per whitespace word (specials excluded), per language, on the (unsampled) input;
1.0 = one token per word; printed as a table and saved to ``fertility.json``.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path
from typing import Iterable, Optional, Sequence

SPECIALS = {"pad": "<pad>", "unk": "<unk>", "bos": "<s>", "eos": "</s>", "mask": "<mask>"}


# ----------------------------------------------------------------------------------------- corpus
def read_corpus(paths: Iterable[str | Path], languages: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
    """{lang: [sentence, ...]} from JSONL caption files and/or ``*.<lang>.txt`` files."""
    out: dict[str, list[str]] = defaultdict(list)
    for path in map(Path, paths):
        if not path.is_file():
            raise FileNotFoundError(f"--input: {path} not found")
        if path.suffix == ".txt":
            lang = path.stem.rsplit(".", 1)[-1]
            out[lang] += [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                for lang, caps in (json.loads(line).get("captions") or {}).items():
                    out[lang] += [c.strip() for c in ([caps] if isinstance(caps, str) else caps) if c.strip()]
    if languages:
        missing = [lang for lang in languages if not out.get(lang)]
        if missing:
            raise ValueError(f"--languages: no sentences for {missing} (found {sorted(out)})")
        out = {lang: out[lang] for lang in languages}
    if not out:
        raise ValueError("no sentences found in the input")
    return dict(out)


def language_probabilities(counts: dict[str, int], alpha: float) -> dict[str, float]:
    """q_l = p_l^alpha / sum_k p_k^alpha with p_l = n_l / sum n (XLM-R temperature sampling)."""
    if not 0 < alpha <= 1:
        raise ValueError(f"alpha must be in (0, 1], got {alpha}")
    total = sum(counts.values())
    w = {lang: (n / total) ** alpha for lang, n in counts.items() if n > 0}
    z = sum(w.values())
    return {lang: v / z for lang, v in w.items()}


def balanced_sample(corpus: dict[str, list[str]], alpha: float, n: Optional[int] = None, seed: int = 0) -> list[str]:
    """``n`` sentences (default: the corpus size): round(n q_l) per language, drawn with replacement."""
    rng = random.Random(seed)
    q = language_probabilities({lang: len(s) for lang, s in corpus.items()}, alpha)
    n = n or sum(len(s) for s in corpus.values())
    out = []
    for lang, p in sorted(q.items()):
        out += rng.choices(corpus[lang], k=max(1, round(n * p)))
    rng.shuffle(out)
    return out


# ----------------------------------------------------------------------------------------- training
def train(sentences: Sequence[str], out_dir: str | Path, vocab_size: int, model_type: str = "unigram",
          character_coverage: float = 0.9995, seed: int = 0) -> Path:
    """Train sentencepiece on ``sentences``; write ``out_dir/spm.model`` + the transformers folder."""
    import sentencepiece as spm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=str(out / "spm"), vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=SPECIALS["pad"], unk_piece=SPECIALS["unk"], bos_piece=SPECIALS["bos"], eos_piece=SPECIALS["eos"],
        user_defined_symbols=[SPECIALS["mask"]], hard_vocab_limit=False,
        input_sentence_size=len(sentences), shuffle_input_sentence=True, minloglevel=2)
    save_transformers(out / "spm.model", out)
    return out


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Merges of a sentencepiece BPE vocab: every split of a piece into two pieces, ordered by the piece's id
    (sentencepiece's merge order), then by the ids of the parts (as transformers' SentencePieceExtractor)."""
    merges = []
    for piece, rank in vocab.items():
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    return [(a, b) for *_, a, b in sorted(merges)]


def to_hf_tokenizer(spm_model: str | Path):
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece model (same ids)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    m = pb.ModelProto()
    m.ParseFromString(Path(spm_model).read_bytes())
    pieces = [(p.piece, p.score) for p in m.pieces]
    unk_id = m.trainer_spec.unk_id
    if m.trainer_spec.model_type == 1:  # UNIGRAM
        tok = Tokenizer(models.Unigram(pieces, unk_id, m.trainer_spec.byte_fallback))
    elif m.trainer_spec.model_type == 2:  # BPE
        vocab = {p: i for i, (p, _) in enumerate(pieces)}
        tok = Tokenizer(models.BPE(vocab, _bpe_merges(vocab), unk_token=pieces[unk_id][0], fuse_unk=True,
                                   byte_fallback=m.trainer_spec.byte_fallback))
    else:
        raise ValueError(f"{spm_model}: model type {m.trainer_spec.model_type} is not unigram/bpe")
    norm = [normalizers.Replace(Regex(" {2,}"), " ")]
    if m.normalizer_spec.precompiled_charsmap:
        norm.insert(0, normalizers.Precompiled(m.normalizer_spec.precompiled_charsmap))
    tok.normalizer = normalizers.Sequence(norm)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    bos, eos = SPECIALS["bos"], SPECIALS["eos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, m.trainer_spec.bos_id), (eos, m.trainer_spec.eos_id)])
    return tok


def save_transformers(spm_model: str | Path, out_dir: str | Path):
    """Write a transformers tokenizer folder for the sentencepiece model and return it (reloaded)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=to_hf_tokenizer(spm_model), bos_token=SPECIALS["bos"], eos_token=SPECIALS["eos"],
        unk_token=SPECIALS["unk"], pad_token=SPECIALS["pad"], mask_token=SPECIALS["mask"],
        cls_token=SPECIALS["bos"], sep_token=SPECIALS["eos"], model_max_length=512)
    fast.save_pretrained(str(out_dir))
    return AutoTokenizer.from_pretrained(str(out_dir))


def fertility(tokenizer, corpus: dict[str, list[str]], max_sentences: int = 2000) -> dict[str, float]:
    """Subword tokens per whitespace word per language (specials excluded)."""
    out = {}
    for lang, sents in sorted(corpus.items()):
        sents = sents[:max_sentences]
        words = sum(len(s.split()) for s in sents)
        tokens = sum(len(ids) for ids in tokenizer(sents, add_special_tokens=False)["input_ids"])
        out[lang] = tokens / max(words, 1)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True, help="comma list of caption JSONL and/or <name>.<lang>.txt files")
    p.add_argument("--languages", default=None, help="comma list (default: every language in the input)")
    p.add_argument("--vocab-size", type=int, default=8000)
    p.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    p.add_argument("--alpha", type=float, default=0.3, help="language sampling exponent (XLM-R: 0.3)")
    p.add_argument("--sentences", type=int, default=None, help="training sentences after balancing")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    corpus = read_corpus([x for x in args.input.split(",") if x],
                         args.languages.split(",") if args.languages else None)
    counts = {lang: len(s) for lang, s in corpus.items()}
    q = language_probabilities(counts, args.alpha)
    sample = balanced_sample(corpus, args.alpha, args.sentences, args.seed)
    out = train(sample, args.out, args.vocab_size, args.model_type, args.character_coverage, args.seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    fert = fertility(tok, corpus)
    report = {"languages": {lang: {"sentences": counts[lang], "sampling_probability": q[lang],
                                   "fertility": fert[lang]} for lang in corpus},
              "alpha": args.alpha, "vocab_size": len(tok), "model_type": args.model_type}
    (out / "fertility.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    print("| lang | sentences | sampling q | fertility (tokens/word) |\n|---|---:|---:|---:|")
    for lang, r in report["languages"].items():
        print(f"| {lang} | {r['sentences']} | {r['sampling_probability']:.3f} | {r['fertility']:.2f} |")
    print(f"vocab {len(tok)} ({args.model_type}) -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
