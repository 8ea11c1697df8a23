"""Composed image retrieval with Deep InfoMax: DIM estimators vs hand-written references, the triplet generator and
the reference image through shards -> batch, the head + loss, the CIRR-style ranks, and a tiny run where the composed
query beats text-only / image-only / late-fusion queries and a plain InfoNCE model without fusion."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mlmm.config import load_config
from mlmm.data.batch import Batch
from mlmm.evaluation.composed import target_ranks
from mlmm.losses.infomax import infonce_mi_loss, jsd_mi_loss

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "configs" / "tiny_cir.yaml"


def sp(x):
    return math.log1p(math.exp(x))


# ------------------------------------------------------------------------------------------ DIM
def dim_inputs():
    g = torch.Generator().manual_seed(0)
    glob = torch.randn(4, 5, generator=g, dtype=torch.float64)
    loc = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)  # sample 3: no local
    exclude = torch.zeros(4, 4, dtype=torch.bool)
    exclude[0, 2] = exclude[2, 0] = True  # samples 0 and 2: neither positive nor negative
    return glob, loc, mask, exclude


def test_jsd_estimator_equals_reference():
    glob, loc, mask, exclude = dim_inputs()
    n = 4
    s = lambda i, j, t: float(glob[i] @ loc[j, t])  # noqa: E731
    locs = lambda j: [t for t in range(3) if mask[j, t]]  # noqa: E731
    pos, neg = [], []
    for i in range(n):
        for j in range(n):
            if not locs(j):  # a sample without locals is never a local side; its global still is
                continue
            if i == j:
                pos.append(sum(math.log(2) - sp(-s(i, j, t)) for t in locs(j)) / len(locs(j)))
            elif not exclude[i, j]:
                neg.append(sum(sp(s(i, j, t)) - math.log(2) for t in locs(j)) / len(locs(j)))
    ref = sum(neg) / len(neg) - sum(pos) / len(pos)
    assert float(jsd_mi_loss(glob, loc, mask, exclude)) == pytest.approx(ref, rel=1e-10)


def test_infonce_estimator_equals_reference():
    glob, loc, mask, exclude = dim_inputs()
    n = 4
    s = lambda i, j, t: float(glob[i] @ loc[j, t])  # noqa: E731
    terms = []
    for i in range(n):
        negatives = [s(i, j, t) for j in range(n) if j != i and not exclude[i, j] for t in range(3) if mask[j, t]]
        for t in range(3):
            if mask[i, t]:
                logits = [s(i, i, t)] + negatives
                terms.append(-(logits[0] - math.log(sum(math.exp(v) for v in logits))))
    ref = sum(terms) / len(terms)
    assert float(infonce_mi_loss(glob, loc, mask, exclude)) == pytest.approx(ref, rel=1e-10)
    # an informative critic (global = its own locals' mean) scores a lower loss than a shuffled one
    aligned = loc.mean(1) * 5
    assert float(infonce_mi_loss(aligned, loc, mask)) < float(infonce_mi_loss(aligned.roll(1, 0), loc, mask))
    assert float(jsd_mi_loss(aligned, loc, mask)) < float(jsd_mi_loss(aligned.roll(1, 0), loc, mask))


def test_target_ranks_remove_the_reference_from_the_gallery():
    scores = torch.tensor([[0.9, 0.5, 0.7, 0.5], [0.1, 0.2, 0.3, 0.4]])
    # query 0: reference = item 0 (the best score) is removed, target 2 is then first; query 1: target 1, tie-free
    ranks = target_ranks(scores, torch.tensor([2, 1]), torch.tensor([0, -1]))
    assert ranks.tolist() == [1, 3]
    assert target_ranks(scores, torch.tensor([1, 1]), torch.tensor([-1, -1])).tolist() == [3, 3]  # optimistic ties


# ------------------------------------------------------------------------------------------ data
@pytest.fixture(scope="module")
def cir_data(tmp_path_factory):
    """200 training scenes (800 triplets, no gallery) + 60 test scenes (180 gallery images, 240 triplets)."""
    from mlmm.synthetic.composed import all_texts, write_composed_shards
    from mlmm.data.tokenization import train_tokenizer

    root = tmp_path_factory.mktemp("cir")
    train = write_composed_shards(root / "train", n_scenes=200, size=32, seed=0, gallery=False, prefix="tr",
                                  shard_size=200)
    test = write_composed_shards(root / "test", n_scenes=60, size=32, seed=1, gallery=True, prefix="te")
    train_tokenizer(all_texts(train + test), root / "tok", vocab_size=300)
    return root


def test_generator_triplets_and_reference_image_reach_the_batch(cir_data):
    from transformers import AutoTokenizer

    from mlmm.synthetic.composed import color_modification, shape_modification
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.shards import iter_samples, resolve_shards

    assert color_modification("square", "blue")["de"][0] == "mach das Quadrat blau"
    assert shape_modification("triangle", "circle")["de"][0] == "mach aus dem Dreieck einen Kreis"
    assert shape_modification("circle", "square")["fr"][1] == "remplace le cercle par un carré"
    samples = list(iter_samples(resolve_shards(str(cir_data / "test" / "shards"))))
    triplets = [s for s in samples if "reference" in s["json"]]
    gallery = {s["__key__"]: s for s in samples if "reference" not in s["json"]}
    assert len(triplets) == 240 and len(gallery) == 180
    t = triplets[0]
    assert "ref.jpg" in t and "jpg" in t and "extra_images" not in t["json"]
    assert t["json"]["reference"] in gallery and t["json"]["target"] in gallery
    assert t["ref.jpg"] == gallery[t["json"]["reference"]]["jpg"] and t["jpg"] == gallery[t["json"]["target"]]["jpg"]
    assert set(t["json"]["modification"]) == {"en", "de", "fr"}
    cfg = load_config(TINY, [f"model.text.tokenizer={cir_data / 'tok'}"])
    pre = Preprocessor(cfg.model, AutoTokenizer.from_pretrained(str(cir_data / "tok")), train=True)
    items = [x for s in samples[:8] for x in pre(s, language_policy="random_language", text_field="modification")]
    batch = pre.collate(items)
    has_ref = [("reference" in m) for m in batch.meta]
    assert batch.extras["ref"].shape == (len(items), 3, 32, 32)
    assert batch.extras["ref_mask"].tolist() == has_ref
    for i, m in enumerate(batch.meta):  # triplet rows carry the modification as their text
        assert (batch.captions[i] in m["modification"][batch.lang[i]]) if has_ref[i] else not batch.text_mask[i]


# ------------------------------------------------------------------------------------------ head + loss
def test_composed_head_and_loss(cir_data):
    from transformers import AutoTokenizer

    from mlmm.models.model import MultimodalModel
    from mlmm.registry import LOSSES

    cfg = load_config(TINY, [f"model.text.tokenizer={cir_data / 'tok'}",
                             "model.heads.composed.dim_sources=[reference,text,target]"])
    tok = AutoTokenizer.from_pretrained(str(cir_data / "tok"))
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, tok)
    loss_fn = LOSSES.get("composed").cls(cfg.loss, model.modalities)
    texts = ["make the circle blue", "turn the square into a circle", "rends le cercle bleu", "mach den Kreis rot"]
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    ref_mask = torch.tensor([True, True, False, True])  # row 2: no reference image -> not a triplet row
    batch = Batch(keys=["a", "b", "c", "d"], image=torch.randn(4, 3, 32, 32),
                  image_mask=torch.ones(4, dtype=torch.bool),
                  text_ids=enc["input_ids"], text_attention=enc["attention_mask"],
                  text_mask=torch.ones(4, dtype=torch.bool), meta=[{"target": k} for k in "wxyz"],
                  extras={"ref": torch.randn(4, 3, 32, 32), "ref_mask": ref_mask})
    out = model(batch)
    assert out["composed_valid"].tolist() == ref_mask.tolist()
    assert out["composed_query"].shape == (4, 32) and float(out["composed_query"][2].detach().abs().sum()) == 0
    assert out["composed_dim_reference"].shape == (4, 16, 32)  # 4x4 patches
    assert out["composed_dim_text_mask"].shape == (4, 16) and out["composed_dim_target"].shape == (4, 16, 32)
    res = loss_fn(out, batch)
    assert set(res) == {"loss", "retrieval_loss", "dim_reference_loss", "dim_text_loss", "dim_target_loss"}
    expect = res["retrieval_loss"] + 0.1 * (res["dim_reference_loss"] + res["dim_text_loss"] + res["dim_target_loss"])
    torch.testing.assert_close(res["loss"], expect)
    # retrieval term = InfoNCE over the 3 triplet rows (query vs target image), by hand
    rows = torch.tensor([0, 1, 3])
    logits = loss_fn.logit_scale.exp() * out["composed_query"][rows] @ out["image"][rows].t()
    lab = torch.arange(3)
    want = 0.5 * (F.cross_entropy(logits, lab) + F.cross_entropy(logits.t(), lab))
    torch.testing.assert_close(res["retrieval_loss"], want)
    res["loss"].backward()
    head = model.heads["composed"]
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert float(model.towers["image"].conv1.weight.grad.abs().sum()) > 0
    # the eval path builds the same query from raw inputs
    model.eval()
    with torch.no_grad():
        again = model(batch)["composed_query"][rows]
        direct = head.encode_query(model, batch.extras["ref"][rows], enc["input_ids"][rows],
                                   enc["attention_mask"][rows])
    torch.testing.assert_close(direct, again, rtol=1e-5, atol=1e-5)
    # a batch without any triplet keeps a (zero) graph through the head
    model.train()
    batch.extras["ref_mask"] = torch.zeros(4, dtype=torch.bool)
    model.zero_grad()
    res = loss_fn(model(batch), batch)
    assert float(res["loss"].detach()) == 0.0
    res["loss"].backward()
    assert all(p.grad is not None for p in head.parameters())


# ------------------------------------------------------------------------------------------ tiny runs
def train_cir(data, out, *overrides):
    from mlmm.training import Trainer

    cfg = load_config(TINY, [f"data.train_shards={data / 'train' / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
                             f"output_dir={out}", "train.progress=false", "train.zero_stage=0", *overrides])
    trainer = Trainer(cfg).setup()
    trainer.train()
    trainer.cleanup()
    return trainer


def mean_metrics(records):
    keys = records[0]["metrics"]
    return {k: sum(r["metrics"][k] for r in records) / len(records) for k in keys}


@pytest.fixture(scope="module")
def cir_run(cir_data, tmp_path_factory):
    from mlmm.evaluation.composed import evaluate_composed, markdown_table

    trainer = train_cir(cir_data, tmp_path_factory.mktemp("cir_run"))
    records = evaluate_composed(trainer.model, str(cir_data / "test" / "shards"))
    print(markdown_table(records))
    return trainer, records


def test_composed_query_beats_text_only_image_only_and_late_fusion(cir_run):
    _, records = cir_run
    assert [r["language"] for r in records] == ["de", "en", "fr"] and all(r["n"] == 480 for r in records)
    ours = mean_metrics(records)
    print({k: round(v, 1) for k, v in ours.items() if "R@" in k})
    # same model, same queries: the text alone finds the class, the image alone the scene, only the composition both
    assert ours["composed_R@1"] > max(ours["text_R@1"], ours["image_R@1"], ours["sum_R@1"]) + 5.0
    assert ours["composed_R@10"] > 85.0 and ours["composed_R@1"] > 10 * ours["chance_R@1"]


@pytest.mark.slow
def test_composed_model_beats_plain_infonce_without_fusion(cir_data, cir_run, tmp_path):
    """A CLIP-style model trained on (target image, modification text) pairs, same data / steps / seed."""
    from mlmm.evaluation.composed import evaluate_composed

    ours = mean_metrics(cir_run[1])
    plain = train_cir(cir_data, tmp_path / "plain", "model.heads={}",
                      "loss={name: contrastive, pairs: [[image, text]]}")
    base = mean_metrics(evaluate_composed(plain.model, str(cir_data / "test" / "shards")))
    print({k: round(v, 1) for k, v in base.items() if "R@" in k})
    assert ours["composed_R@1"] > max(base["text_R@1"], base["image_R@1"], base["sum_R@1"]) + 20.0


def test_tiny_cir_recipe_exports_and_evaluates_through_the_cli(cir_data, tmp_path, monkeypatch):
    """`python recipes/train.py --config tiny_cir.yaml` in-process, then `eval/run_composed.py` on the export."""
    import json
    import runpy

    from mlmm.training import distributed

    monkeypatch.setattr(distributed, "cleanup", distributed.barrier)  # keep the process group for later tests
    train = runpy.run_path(str(REPO / "recipes" / "train.py"))["main"]
    assert train(["--config", str(TINY), f"data.train_shards={cir_data / 'train' / 'shards'}",
                  f"model.text.tokenizer={cir_data / 'tok'}", f"output_dir={tmp_path / 'run'}",
                  "train.max_steps=3"]) == 0
    evaluate = runpy.run_path(str(REPO / "eval" / "run_composed.py"))["main"]
    out = tmp_path / "composed.json"
    assert evaluate(["--checkpoint", str(tmp_path / "run" / "export"), "--shards", str(cir_data / "test" / "shards"),
                     "--languages", "en,de", "--out", str(out)]) == 0
    records = json.loads(out.read_text())["results"]
    assert [r["language"] for r in records] == ["de", "en"]
    want = {"composed_R@1", "composed_R@10", "composed_R@50", "text_R@1", "image_R@1", "sum_R@1"}
    assert want <= set(records[0]["metrics"])
