"""Captioning: metrics equal pycocoevalcap / sacrebleu on the same inputs, the decoder (teacher forcing, greedy,
beam) and a caption decoder overfitting 8 captions; slow: real Vietnamese captions (../shared/data/images_vi)."""
import logging
import os
import random
from pathlib import Path

import pytest
import torch

from mlmm.evaluation import captioning
from mlmm.evaluation.captioning import caption_metrics, char_tokenize, simple_tokenize

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"

PREDS = {"1": "a man rides a red bike", "2": "two dogs play in the snow", "3": "a woman is cooking dinner"}
REFS = {"1": ["a man riding a red bicycle", "a person rides a bike down the street", "a man on a red bike"],
        "2": ["two dogs playing in snow", "dogs run through the snow", "two brown dogs play in the snow"],
        "3": ["a woman cooks dinner in a kitchen", "a lady is cooking", "a woman is making dinner"]}


def test_bleu_rouge_cider_equal_pycocoevalcap_on_the_same_inputs():
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    m, info = caption_metrics(PREDS, REFS, "en", tokenization="simple", meteor=False)
    assert info["tokenization"] == "simple" and "METEOR" not in m
    gts = {k: [simple_tokenize(c) for c in v] for k, v in REFS.items()}
    res = {k: [simple_tokenize(v)] for k, v in PREDS.items()}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for i in range(4):
        assert m[f"BLEU-{i + 1}"] == pytest.approx(100 * bleu[i])
    assert m["ROUGE-L"] == pytest.approx(100 * Rouge().compute_score(gts, res)[0])
    assert m["CIDEr-D"] == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    import sacrebleu

    refs_t = [[REFS[k][i] for k in sorted(REFS)] for i in range(3)]
    hyps = [PREDS[k] for k in sorted(PREDS)]
    assert m["sacreBLEU"] == pytest.approx(sacrebleu.corpus_bleu(hyps, refs_t).score)
    assert m["chrF"] == pytest.approx(sacrebleu.corpus_chrf(hyps, refs_t).score)


def test_bleu_hand_values():
    # identical hypothesis and reference: every BLEU is 100
    m, _ = caption_metrics({"a": "a small red circle on grey"}, {"a": ["a small red circle on grey"]}, "en",
                           tokenization="simple", meteor=False)
    assert all(m[f"BLEU-{n}"] == pytest.approx(100.0, abs=1e-4) for n in range(1, 5))
    # hyp "red circle" vs ref "a red circle here": p1 = 2/2, brevity penalty exp(1 - 4/2) -> BLEU-1 = 100 e^-1
    m, _ = caption_metrics({"a": "red circle"}, {"a": ["a red circle here"]}, "en", tokenization="simple", meteor=False)
    assert m["BLEU-1"] == pytest.approx(100 * torch.exp(torch.tensor(-1.0)).item(), rel=1e-5)


def test_char_tokenisation_for_languages_without_spaces_is_stated():
    assert char_tokenize("两个人，在跑。") == "两 个 人 在 跑"
    _, info = caption_metrics({"a": "两个人在跑"}, {"a": ["两个人在跑步", "两个男人"]}, "zh", meteor=False)
    assert info["tokenization"] == "char" and info["sacrebleu_tokenize"] == "zh"
    assert captioning.coco_tokenization("th") == "char" and captioning.coco_tokenization("vi") == "simple"


def test_meteor_is_skipped_with_a_warning_without_java(monkeypatch, caplog):
    monkeypatch.setattr(captioning, "java_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        m, info = caption_metrics(PREDS, REFS, "en")
    assert "METEOR" not in m and info["tokenization"] == "simple" and not info["meteor"]
    assert "METEOR skipped" in caplog.text
    assert m["BLEU-4"] > 0 and m["CIDEr-D"] > 0


@pytest.mark.skipif(not captioning.java_available(), reason="java not installed")
def test_meteor_and_ptb_with_java():
    m, info = caption_metrics(PREDS, REFS, "en")
    assert info["tokenization"] == "ptb" and 0 < m["METEOR"] < 100


# ------------------------------------------------------------------------------------------ decoder
def tiny_caption_model(tok_dir, languages=("en", "de")):
    from transformers import AutoTokenizer

    from mlmm.config import build_config
    from mlmm.models.model import MultimodalModel

    cfg = build_config({"model": {
        "embed_dim": 32, "image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
        "text": {"tokenizer": str(tok_dir), "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64,
                 "max_length": 16},
        "heads": {"caption": {"name": "caption", "width": 64, "layers": 2, "heads": 4, "languages": list(languages),
                              "max_length": 16}}}})
    return cfg, MultimodalModel(cfg.model, AutoTokenizer.from_pretrained(str(tok_dir)))


@pytest.fixture(scope="module")
def caption_data(tmp_path_factory):
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("cap")
    rows = generate(root / "gen", n_images=60, n_videos=0, n_audio=0, size=32, seed=3, progress=False)
    seen, picked = set(), []
    for r in rows:  # 8 images of 8 different classes
        if r["class"] not in seen:
            seen.add(r["class"])
            picked.append(r)
        if len(picked) == 8:
            break
    train_tokenizer([c for r in rows for caps in r["captions"].values() for c in caps], root / "tok", vocab_size=200)
    return root, picked


def batch_of(cfg, model, rows, root, lang="en", which=1):
    from mlmm.data.preprocess import Preprocessor

    pre = Preprocessor(cfg.model, model.tokenizer, train=False)
    samples = []
    for r in rows:
        raw = {"__key__": r["key"], "jpg": (root / "gen" / r["image"]).read_bytes(),
               "json": {"captions": {lang: [r["captions"][lang][which]]}}}
        samples += pre(raw, random.Random(0))
    return pre.collate(samples)


def test_decoder_teacher_forcing_matches_incremental_decoding_and_beam1_is_greedy(caption_data):
    root, rows = caption_data
    torch.manual_seed(0)
    cfg, model = tiny_caption_model(root / "tok")
    model.eval()
    batch = batch_of(cfg, model, rows[:3], root)
    head = model.heads["caption"]
    with torch.no_grad():
        out = model(batch)
        logits = out["caption_logits"]  # [B, L-1, V]
        _, ctx, cmask = model.encode_tokens("image", batch.image)
        langs, _ = head.lang_ids(batch.lang, ctx.device)
        for t in (1, 3, 5):  # step t only sees the prefix: same logits as decoding the prefix alone
            step = head.decode(langs, batch.text_ids[:, 1:t + 1], None, ctx, cmask)[:, -1]
            torch.testing.assert_close(step, logits[:, t], rtol=1e-4, atol=1e-5)
        greedy = head.generate(ctx, cmask, batch.lang, method="greedy", max_new_tokens=8)
        beam1 = head.generate(ctx, cmask, batch.lang, method="beam", beam_size=1, max_new_tokens=8, length_penalty=0)
    assert greedy == beam1
    assert out["caption_target_mask"].sum() == batch.text_attention[:, 1:].sum()
    with pytest.raises(ValueError, match="not in the decoder's languages"):
        head.generate(ctx, cmask, ["xx"] * 3)


def test_caption_decoder_overfits_8_captions(caption_data):
    """Teacher forcing on 8 (image, caption) pairs; greedy and beam decoding reproduce them (BLEU-4 ~ 100)."""
    from mlmm.losses.caption import CaptionLoss, CaptionLossConfig

    root, rows = caption_data
    torch.manual_seed(0)
    cfg, model = tiny_caption_model(root / "tok")
    batch = batch_of(cfg, model, rows, root, which=1)  # "a photo of a <color> <shape>"
    loss_fn = CaptionLoss(CaptionLossConfig(), model.modalities)
    params = [p for n, p in model.named_parameters() if not n.startswith(("towers.text", "proj"))]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(200):
        loss = loss_fn(model(batch), batch)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    from mlmm.evaluation.captioning import generate_captions

    refs = {r["key"]: [r["captions"]["en"][1]] for r in rows}
    for method in ("greedy", "beam"):
        hyps = generate_captions(model, model.heads["caption"], batch.image, ["en"] * 8, method=method, beam_size=3)
        m, _ = caption_metrics(dict(zip(refs, hyps)), refs, "en", tokenization="simple", meteor=False)
        print(method, loss.item(), m["BLEU-4"], hyps[:2])
        assert m["BLEU-4"] > 95, (method, m, hyps)


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED / "images_vi" / "captions.jsonl").is_file(), reason="../shared/data/images_vi absent")
def test_images_vi_captioning_benchmark(tmp_path):
    """Train the tiny captioner on 160 Vietnamese-captioned photos, caption the other 40 (beam 3); report the
    numbers honestly (a 0.3 M-parameter model trained for minutes: expect low scores)."""
    import json

    from mlmm.config import load_config
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards
    from mlmm.evaluation.captioning import evaluate_captioning
    from mlmm.hub import from_pretrained
    from mlmm.training import Trainer

    src = SHARED / "images_vi"
    rows = [json.loads(x) for x in (src / "captions.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [{"key": f"vi-{r['id']}", "image": str(src / r["image"]), "captions": r["captions"]} for r in rows]
    splits = {"train": rows[:160], "test": rows[160:]}
    for name, part in splits.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
        write_shards(tmp_path / f"{name}.jsonl", tmp_path / name, shard_size=200, progress=False)
    train_tokenizer([c for r in splits["train"] for c in r["captions"]["vi"]], tmp_path / "tok", vocab_size=1000)
    steps = int(os.environ.get("MLMM_VI_STEPS", "600"))
    cfg = load_config(REPO / "recipes" / "configs" / "tiny_caption.yaml", [
        f"data.train_shards={tmp_path / 'train'}", f"model.text.tokenizer={tmp_path / 'tok'}",
        f"output_dir={tmp_path / 'run'}", f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false",
        f"train.max_steps={steps}", "model.image.image_size=64", "model.text.max_length=40",
        "model.heads.caption.max_length=40"])
    trainer = Trainer(cfg).setup()
    trainer.train()
    export = trainer.export()
    trainer.cleanup()
    records = evaluate_captioning(from_pretrained(export), str(tmp_path / "test"), languages=["vi"],
                                  dataset="images_vi", method="beam", beam_size=3, progress=False)
    m = records[0]["metrics"]
    print("images_vi (40 held-out photos, 5 refs each):", {k: round(v, 2) for k, v in m.items()},
          records[0]["info"]["examples"])
    assert records[0]["n"] == 40 and m["BLEU-1"] > 0


def test_captioning_command_writes_the_records_and_prints_the_table(caption_data, tmp_path, capsys):
    """``mlmm-eval-captioning`` on an export: exit 0, the records in --out, the metrics table, each language's
    tokenisation line and the path it wrote."""
    import json

    from mlmm.cli.eval_captioning import main
    from mlmm.data.write_shards import write_manifest, write_shards
    from mlmm.hub import save_pretrained

    root, rows = caption_data
    torch.manual_seed(0)
    _, model = tiny_caption_model(root / "tok")
    export = save_pretrained(model.eval(), tmp_path / "export")
    manifest = write_manifest([{**r, "image": str(root / "gen" / r["image"])} for r in rows], tmp_path / "m.jsonl")
    write_shards(manifest, tmp_path / "shards", progress=False)
    out = tmp_path / "captioning.json"
    assert main(["--model", str(export), "--shards", str(tmp_path / "shards"), "--languages", "en,de",
                 "--decoding", "greedy", "--no-meteor", "--device", "cpu", "--workers", "0", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert sorted(r["language"] for r in saved) == ["de", "en"] and all(r["n"] == 8 for r in saved)
    assert all({"BLEU-4", "ROUGE-L", "CIDEr-D"} <= r["metrics"].keys() for r in saved)
    assert "| BLEU-4" in printed or "BLEU-4" in printed.splitlines()[0]
    assert "en: tokenisation" in printed and "de: tokenisation" in printed and printed.rstrip().endswith(f"wrote {out}")
