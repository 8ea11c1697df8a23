"""Zero-shot classification per language (issue 21 part 2): CLIP_benchmark's metrics, class names and templates
from YAML users extend, generated shapes (image) and FSDD spoken digits (audio, held-out speaker) with tiny models
trained here."""
import json
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

import eval_zoo  # tests/ is on sys.path under pytest (its default "prepend" import mode)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


@contextmanager
def one_thread():
    """Tiny models train fastest on one thread (and a loaded box does not oversubscribe); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def train_tiny(cfg_dict, regroup=None):
    """benchmarks/cached_training.train_cached on a RunConfig built from ``cfg_dict``; ``regroup(row) -> key``
    replaces each row's key (rows sharing a key are never each other's negatives)."""
    from benchmarks.cached_training import decode_rows, train_cached
    from mlmm.config import build_config

    def decode(shards, pre):
        rows = decode_rows(shards, pre)
        return [{**r, "key": regroup(r)} for r in rows] if regroup else rows

    with one_thread():
        model, history = train_cached(build_config(cfg_dict), log_every=1000, log=lambda *a: None, decode=decode)
    return model, history


def test_metrics_are_clip_benchmarks():
    """acc1 / acc5 by top-k, mean per-class recall = balanced accuracy over the classes present; acc5 left out
    below 5 classes (CLIP_benchmark writes NaN)."""
    from mlmm.evaluation.zeroshot import classification_metrics

    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(200, 7, generator=g), torch.randint(0, 6, (200,), generator=g)  # class 6 unused
    m = classification_metrics(logits, target)
    top = logits.topk(5, dim=1).indices
    assert m["acc1"] == pytest.approx(float((top[:, 0] == target).float().mean()))
    assert m["acc5"] == pytest.approx(float((top == target[:, None]).any(1).float().mean()))
    pred = logits.argmax(1)
    recalls = [float((pred[target == c] == c).float().mean()) for c in range(6)]
    assert m["mean_per_class_recall"] == pytest.approx(sum(recalls) / 6)
    try:
        from sklearn.metrics import balanced_accuracy_score
    except ImportError:
        pass
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true"
            assert m["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, pred))
    assert set(classification_metrics(logits[:, :4], target.clamp(max=3))) == {"acc1", "mean_per_class_recall"}


def test_classifier_is_the_normalised_mean_of_normalised_prompts():
    import torch.nn.functional as F

    from mlmm.evaluation.zeroshot import zeroshot_classifier

    table = {"a X": [3.0, 4.0], "the X": [1.0, 0.0], "a Y": [0.0, 2.0], "the Y": [0.0, -1.0]}
    w = zeroshot_classifier(lambda texts: torch.tensor([table[t] for t in texts]), ["X", "Y"], ["a {c}", "the {c}"])
    want = F.normalize(torch.tensor([[0.6 + 1.0, 0.8], [0.0, 0.0 + 1e-9]]), dim=-1)
    assert torch.allclose(w[0], want[0])  # class Y's prompts cancel: the guard in F.normalize keeps it finite
    assert torch.isfinite(w).all()


def test_prompts_yaml_merge_and_errors(tmp_path):
    from mlmm.evaluation.prompts import class_set, load_prompts

    base = load_prompts()
    assert base["datasets"]["fsdd"]["classes"]["de"][0] == "null"  # quoted in YAML: a word, not None
    mine = tmp_path / "mine.yaml"
    mine.write_text(yaml.safe_dump({"templates": {"image": {"de": ["Foto: {c}"], "sv": ["ett foto av {c}"]}},
                                    "datasets": {"pets": {"classes": {"en": ["cat", "dog"], "sv": ["katt", "hund"]}}}}))
    merged = load_prompts([mine])
    assert merged["templates"]["image"]["de"] == ["Foto: {c}"] and merged["templates"]["image"]["en"]
    pets = class_set("pets", merged)
    assert pets.templates_for("image", "sv", merged) == ["ett foto av {c}"] and len(pets) == 2
    assert pets.label({"label": 1}) == 1 and pets.label({"label": "dog"}) == 1 and pets.label({"label": 5}) is None
    bad = tmp_path / "bad.yaml"
    for content, msg in (({"templates": {"image": {"en": ["no placeholder"]}}}, "needs the class placeholder"),
                         ({"datasets": {"x": {"classes": {"en": ["a"], "de": ["a", "b"]}}}}, "same number of classes"),
                         ({"datasets": {"x": {"classes": {"de": [None, "eins"]}}}}, "quote YAML words like null"),
                         ({"colours": {}}, "unknown keys")):
        bad.write_text(yaml.safe_dump(content))
        with pytest.raises(ValueError, match=msg):
            load_prompts([bad])


def test_generated_shapes_zero_shot_with_a_trained_tiny_model(tmp_path):
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards
    from mlmm.evaluation.zeroshot import evaluate_zeroshot

    rows = generate(tmp_path / "gen", n_images=150, n_videos=0, n_audio=0, size=32, seed=0, progress=False)
    for name, part in (("train", rows[:-36]), ("test", rows[-36:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({**r, "image": str(tmp_path / "gen" / r["image"])}) + "\n" for r in part))
        write_shards(tmp_path / f"{name}.jsonl", tmp_path / name, shard_size=20, progress=False)
    train_tokenizer([c for r in rows for caps in r["captions"].values() for c in caps], tmp_path / "tok",
                    vocab_size=150)
    model, _ = train_tiny({"seed": 0, "data": {"train_shards": str(tmp_path / "train"), "batch_size": 32},
                           "model": {"embed_dim": 32,
                                     "image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "heads": 2},
                                     "text": {"tokenizer": str(tmp_path / "tok"), "hidden": 32, "layers": 1,
                                              "heads": 2, "intermediate": 64, "max_length": 16}},
                           "loss": {"name": "contrastive", "pairs": [["image", "text"]]},
                           "train": {"max_steps": 100, "lr": 3e-3, "warmup_steps": 5}})
    records = evaluate_zeroshot(model, str(tmp_path / "test"), classes="shapes",
                                prompts=[eval_zoo.shapes_prompts(tmp_path / "prompts.yaml")], progress=False)
    assert {r["language"] for r in records} == {"en", "de", "fr"}
    for r in records:
        assert r["task"] == "zeroshot_classification" and r["modality"] == "image" and r["n"] == 36
        assert r["metrics"]["n_classes"] == 18 and r["skipped"] == {}
        assert r["metrics"]["acc1"] >= 3 / 18 and r["metrics"]["acc5"] >= 0.5, r  # chance: 1/18 and 5/18


@pytest.mark.skipif(not (SHARED / "audio_fsdd" / "manifest.jsonl").is_file(), reason="../shared/data not present")
def test_fsdd_spoken_digits_above_chance_on_a_held_out_speaker(tmp_path):
    """Trained on 5 speakers (250 clips, captions en/de/fr/es), classified zero-shot on the 6th (theo, 50 clips)
    with the class names and templates of mlmm/evaluation/zeroshot.yaml."""
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import read_manifest, shared_data_manifest, write_shards

    rows = [r for r in read_manifest(shared_data_manifest(SHARED, tmp_path / "all.jsonl"))
            if r.get("source") == "audio_fsdd"]
    for name, part in (("train", [r for r in rows if r["speaker"] != "theo"]),
                       ("test", [r for r in rows if r["speaker"] == "theo"])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        write_shards(tmp_path / f"{name}.jsonl", tmp_path / name, shard_size=100, progress=False)
    train_tokenizer([c for r in rows for c in r["captions"].values()], tmp_path / "tok", vocab_size=120)
    model, history = train_tiny(
        {"seed": 0, "data": {"train_shards": str(tmp_path / "train"), "batch_size": 32},
         "model": {"embed_dim": 32,
                   "audio": {"sample_rate": 8000, "seconds": 0.64, "n_mels": 16, "n_fft": 256, "hop_length": 128,
                             "patch_size": 4, "width": 32, "layers": 1, "heads": 2},
                   "text": {"tokenizer": str(tmp_path / "tok"), "hidden": 32, "layers": 1, "heads": 2,
                            "intermediate": 64, "max_length": 12}},
         "loss": {"name": "contrastive", "pairs": [["audio", "text"]]},
         "train": {"max_steps": 150, "lr": 3e-3, "warmup_steps": 10}},
        regroup=lambda row: f"digit{row['meta']['digit']}")  # identical captions are not each other's negatives
    from mlmm.evaluation.zeroshot import evaluate_zeroshot

    records = evaluate_zeroshot(model, str(tmp_path / "test"), classes="fsdd", progress=False)
    acc1 = {r["language"]: r["metrics"]["acc1"] for r in records}
    acc5 = {r["language"]: r["metrics"]["acc5"] for r in records}
    print(f"FSDD zero-shot, held-out speaker theo (50 clips, chance acc1 0.10 / acc5 0.50): acc1 {acc1}, acc5 {acc5}")
    assert set(acc1) == {"en", "de", "fr", "es"} and all(r["n"] == 50 for r in records)
    assert sum(acc1.values()) / 4 >= 0.18 and min(acc5.values()) >= 0.7


def test_video_zero_shot_with_an_image_model_averages_frame_embeddings(tmp_path):
    """Video through an image-only model (open_clip local-dir): each clip = mean of its normalised frame embeddings;
    zero-shot records come out per language with the video modality."""
    import torch.nn.functional as F

    from mlmm.synthetic.shapes import generate
    from mlmm.data.write_shards import write_shards
    from mlmm.evaluation.models import load_model
    from mlmm.evaluation.zeroshot import evaluate_zeroshot

    rows = generate(tmp_path / "gen", n_images=0, n_videos=4, n_audio=0, size=32, seed=1, progress=False)
    write_shards(tmp_path / "gen" / "manifest.jsonl", tmp_path / "shards", progress=False)
    oc = eval_zoo.open_clip_models(tmp_path)
    model = load_model(f"local-dir:{oc['local']},frames=3")
    clip = model.transform()({"mp4": (tmp_path / "gen" / rows[0]["video"]).read_bytes()})["video"]  # [3, 3, 32, 32]
    with torch.no_grad():
        frames = F.normalize(model.model.encode_image(clip), dim=-1)  # open_clip's own encode_image per frame
    torch.testing.assert_close(model.encode_video(clip[None])[0], F.normalize(frames.mean(0), dim=0), rtol=0,
                               atol=1e-6)
    directions = ["left", "right", "up", "down"]
    (tmp_path / "moves.yaml").write_text(yaml.safe_dump({"datasets": {"moves": {
        "modality": "video", "label_key": "labels", "ids": directions,
        "classes": {"en": [f"moving {d}" for d in directions], "de": ["nach links", "nach rechts", "nach oben",
                                                                      "nach unten"]}}}}))
    for r in rows:
        r["labels"] = r["labels"][-1]  # the direction
    (tmp_path / "m.jsonl").write_text("".join(json.dumps({**r, "video": str(tmp_path / "gen" / r["video"])}) + "\n"
                                              for r in rows))
    write_shards(tmp_path / "m.jsonl", tmp_path / "moves", progress=False)
    records = evaluate_zeroshot(model, str(tmp_path / "moves"), classes="moves", prompts=[tmp_path / "moves.yaml"],
                                progress=False)
    assert [(r["language"], r["modality"], r["n"]) for r in records] == [("de", "video", 4), ("en", "video", 4)]
    assert all(0 <= r["metrics"]["acc1"] <= 1 and "acc5" not in r["metrics"] for r in records)  # 4 classes < 5
