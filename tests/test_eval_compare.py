"""Results people can compare (issue 21 part 4): CLIP_benchmark-compatible rows, eval/compare.py merging several
results files (CLIP_benchmark's included) into one table and one plot, and the metrics as offline `evaluate`
modules giving the suite's figures."""
import json
import random
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def rec(model, task, dataset, lang, metrics, pretrained=""):
    return {"task": task, "dataset": dataset, "language": lang, "n": 10, "metrics": metrics, "model": model,
            "pretrained": pretrained, "skipped": {}}


def test_compare_merges_mlmm_and_clip_benchmark_results(tmp_path, capsys):
    import runpy

    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    (a / "results.json").write_text(json.dumps({"results": [
        rec("mlmm:mine", "image-text", "xtd10", "en", {"t2i_R@1": 40.0, "i2t_R@1": 50.0, "chance_t2i_R@1": 0.1}),
        rec("mlmm:mine", "image-text", "xtd10", "de", {"t2i_R@1": 30.0, "i2t_R@1": 36.0}),
        rec("mlmm:mine", "zeroshot_classification", "fsdd", "de", {"acc1": 0.25, "mean_per_class_recall": 0.2})]}))
    (b / "results.json").write_text(json.dumps({"results": [  # an older file: no model key -> --label
        {"task": "image-text", "dataset": "xtd10", "language": "en", "n": 10, "metrics": {"t2i_R@1": 60.0,
                                                                                          "i2t_R@1": 70.0}}]}))
    cb = tmp_path / "cb"
    cb.mkdir()  # CLIP_benchmark's own output files, one per run
    (cb / "xtd10_openai_ViT-B-32_de_zeroshot_retrieval.json").write_text(json.dumps({
        "dataset": "xtd10", "model": "ViT-B-32", "pretrained": "openai", "task": "zeroshot_retrieval",
        "metrics": {"image_retrieval_recall@1": 0.3, "text_retrieval_recall@1": 0.34}, "language": "de"}))
    (cb / "fsdd.json").write_text(json.dumps({
        "dataset": "fsdd", "model": "ViT-B-32", "pretrained": "openai", "task": "zeroshot_classification",
        "metrics": {"acc1": 0.125, "acc5": float("nan"), "mean_per_class_recall": 0.1}, "language": "de"}))
    main = runpy.run_path(str(REPO / "eval" / "compare.py"))["main"]
    assert main([str(a / "results.json"), str(b / "results.json"), str(cb), "--label", f"{b / 'results.json'}=old",
                 "--out", str(tmp_path / "cmp")]) == 0
    md = (tmp_path / "cmp.md").read_text()
    assert md.splitlines()[0] == "| dataset | task | metric | model | de | en |"
    assert "| xtd10 | image-text | mean R@1 | mlmm:mine | **33.00** | 45.00 |" in md
    assert "| xtd10 | image-text | mean R@1 | old | – | **65.00** |" in md
    assert "| xtd10 | image-text | mean R@1 | ViT-B-32 (openai) | 32.00 | – |" in md  # 0.30 / 0.34 -> percent
    assert "| fsdd | zeroshot_classification | top-1 accuracy | mlmm:mine | **0.2500** | – |" in md
    assert "| fsdd | zeroshot_classification | top-1 accuracy | ViT-B-32 (openai) | 0.1250 | – |" in md
    png = (tmp_path / "cmp.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert main([str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.json: results file not found" in capsys.readouterr().err


@pytest.fixture(scope="module")
def hf_metrics(tmp_path_factory):
    import evaluate
    import huggingface_hub.constants

    from mlmm.evaluation.hf_metrics import metric_path

    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = True
    try:
        return {n: evaluate.load(metric_path(n)) for n in ("mlmm_retrieval", "mlmm_vqa", "mlmm_captioning")}
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = offline


def test_evaluate_retrieval_module_equals_the_suites_metric(hf_metrics):
    from mlmm.evaluation.retrieval import retrieval_metrics

    g = torch.Generator().manual_seed(0)
    q, gal = torch.randn(30, 8, generator=g), torch.randn(20, 8, generator=g)
    rng = random.Random(0)
    positives = [rng.sample(range(20), rng.randint(1, 3)) for _ in range(30)]
    got = hf_metrics["mlmm_retrieval"].compute(predictions=(q.double() @ gal.double().T).tolist(),
                                               references=positives, ks=[1, 5])
    want = retrieval_metrics(q.double(), gal.double(), positives, ks=(1, 5))
    assert got == pytest.approx(want, abs=1e-9)


def test_evaluate_vqa_and_captioning_modules_equal_the_suites_metrics(hf_metrics):
    from mlmm.evaluation.captioning import caption_metrics
    from mlmm.evaluation.vqa import vqa_report

    preds, answers = ["Two", "red.", "yes"], [["2"] * 7 + ["3"] * 3, ["red"] * 2 + ["blue"] * 8, ["no"] * 10]
    got = hf_metrics["mlmm_vqa"].compute(predictions=preds, references=answers,
                                         answer_types=["number", "other", "yes/no"])
    want = vqa_report(preds, [{"answers": a, "answer_type": t} for a, t in zip(answers, ["number", "other", "yes/no"])])
    assert got == pytest.approx(want)
    hyps, refs = ["ein roter Kreis", "ein blaues Quadrat auf grau"], [["ein roter Kreis", "ein Kreis in Rot"],
                                                                        ["ein blaues Quadrat", "blaues Quadrat"]]
    got = hf_metrics["mlmm_captioning"].compute(predictions=hyps, references=refs, language="de", meteor=False)
    want, info = caption_metrics({"0": hyps[0], "1": hyps[1]}, {"0": refs[0], "1": refs[1]}, "de", meteor=False)
    assert got.pop("tokenization") == info["tokenization"] and got == pytest.approx(want)
