"""mlmm.data.sentencepiece (mlmm-sentencepiece, tokenizers/train_sentencepiece.py): language-balanced sampling,
training, HF round trip, fertility, use in a tower."""
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data" / "multi30k" / "train_5k.jsonl"


@pytest.fixture(scope="module")
def sp():
    from mlmm.data import sentencepiece

    return sentencepiece


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    """Parallel captions: real Multi30K lines when ../shared/data exists, else generated ones; 'cs' is rare."""
    path = tmp_path_factory.mktemp("spm") / "captions.jsonl"
    if SHARED.is_file():
        rows = [json.loads(line) for line in SHARED.read_text(encoding="utf-8").splitlines()[:1500]]
    else:
        from mlmm.synthetic.shapes import image_captions

        rows = [{"captions": {k: v[0] for k, v in image_captions(c, s).items()}}
                for c in ("red", "blue", "green") for s in ("circle", "square", "triangle")] * 40
        for r in rows:
            r["captions"]["cs"] = r["captions"]["en"]
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            caps = dict(r["captions"])
            if i % 10:  # make cs low-resource (10x rarer)
                caps.pop("cs", None)
            f.write(json.dumps({"captions": caps}, ensure_ascii=False) + "\n")
    return path


def test_temperature_sampling_upsamples_low_resource(sp):
    q = sp.language_probabilities({"en": 1000, "cs": 10}, alpha=0.3)
    p_cs = 10 / 1010
    assert q["cs"] == pytest.approx(p_cs ** 0.3 / (p_cs ** 0.3 + (1000 / 1010) ** 0.3))
    assert q["cs"] > 5 * p_cs and sum(q.values()) == pytest.approx(1.0)
    assert sp.language_probabilities({"en": 1000, "cs": 10}, alpha=1.0)["cs"] == pytest.approx(p_cs)
    sample = sp.balanced_sample({"en": [f"e{i}" for i in range(1000)], "cs": [f"c{i}" for i in range(10)]}, 0.3, n=2000)
    n_cs = sum(s.startswith("c") for s in sample)
    assert abs(n_cs - 2000 * q["cs"]) <= 1


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_train_roundtrip_fertility(sp, corpus_file, tmp_path, model_type):
    import sentencepiece
    from transformers import AutoTokenizer

    out = tmp_path / model_type
    assert sp.main(["--input", str(corpus_file), "--vocab-size", "400", "--model-type", model_type,
                    "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(str(out))  # a plain transformers folder
    proc = sentencepiece.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert len(tok) == proc.get_piece_size()
    ids = [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.mask_token_id]
    assert ids == [0, 1, 2, 3, 4]
    corpus = sp.read_corpus([corpus_file])
    texts = [t for lang in corpus for t in corpus[lang][:100]] + ["Ünïcödé  spaces  ✓ 123", "x"]
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids == [2, *proc.encode(text), 3], text
        if tok.unk_token_id not in ids:  # sentencepiece renders unknown pieces as " ⁇ ", HF drops them
            assert tok.decode(ids, skip_special_tokens=True) == proc.decode(proc.encode(text))
    report = json.loads((out / "fertility.json").read_text())
    fert = {lang: r["fertility"] for lang, r in report["languages"].items()}
    assert set(fert) == set(corpus) and all(1.0 <= f < 6 for f in fert.values())
    words = sum(len(s.split()) for s in corpus["de"][:2000])
    tokens = sum(len(proc.encode(s)) for s in corpus["de"][:2000])
    assert fert["de"] == pytest.approx(tokens / words)
    assert report["languages"]["cs"]["sampling_probability"] > report["languages"]["cs"]["sentences"] / sum(
        r["sentences"] for r in report["languages"].values())


def test_tokenizer_drives_the_text_tower(sp, corpus_file, tmp_path):
    from mlmm.config import TextTowerConfig
    from mlmm.models.towers.text import TextTower
    from transformers import AutoTokenizer

    sp.main(["--input", str(corpus_file), "--vocab-size", "300", "--out", str(tmp_path / "tok")])
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    tower = TextTower(TextTowerConfig(tokenizer=str(tmp_path / "tok"), arch="xlm-roberta", max_length=16),
                      vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    enc = tok(["ein Hund", "a dog running on the beach"], padding="max_length", max_length=16, truncation=True,
              return_tensors="pt")
    h = tower(enc["input_ids"], enc["attention_mask"])
    assert h.shape == (2, 32) and torch.isfinite(h).all()
