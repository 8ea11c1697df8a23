"""The evaluation suite runs retrieval, VQA and captioning per language and writes results.json / .md / .png."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def suite_setup(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer

    from mlmm.config import build_config
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.synthetic.vqa import generate_vqa
    from mlmm.data.write_shards import write_shards
    from mlmm.hub import save_pretrained
    from mlmm.models.model import MultimodalModel

    root = tmp_path_factory.mktemp("suite")
    rows = generate(root / "gen", n_images=12, n_videos=0, n_audio=0, size=32, seed=5, progress=False)
    vqa = generate_vqa(root / "vqa", n_images=6, questions_per_image=2, size=32, seed=5, progress=False)
    write_shards(root / "gen" / "manifest.jsonl", root / "gen_shards", shard_size=100, progress=False)
    write_shards(root / "vqa" / "manifest.jsonl", root / "vqa_shards", shard_size=100, progress=False)
    texts = [c for r in rows for caps in r["captions"].values() for c in caps] + \
        [q for r in vqa for q in r["question"].values()]
    train_tokenizer(texts, root / "tok", vocab_size=200)
    cfg = build_config({"model": {
        "embed_dim": 16, "image": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "heads": 2},
        "text": {"tokenizer": str(root / "tok"), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32,
                 "max_length": 16},
        "heads": {"vqa": {"name": "vqa", "width": 16, "layers": 1, "heads": 2, "answers": ["2", "red", "yes", "rot"]},
                  "caption": {"name": "caption", "width": 16, "layers": 1, "heads": 2, "languages": ["en", "de"],
                              "max_length": 12}}}})
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, AutoTokenizer.from_pretrained(str(root / "tok")))
    export = save_pretrained(model, root / "export")
    suite = {"name": "unit", "tasks": [
        {"task": "retrieval", "dataset": "gen", "shards": "gen_shards", "languages": ["en", "de"]},
        {"task": "vqa", "dataset": "shapes-vqa", "shards": "vqa_shards", "languages": ["en", "de", "fr"]},
        {"task": "captioning", "dataset": "gen", "shards": "gen_shards", "languages": ["en", "de"],
         "decoding": "greedy", "meteor": False},
        {"task": "captioning", "dataset": "missing", "shards": "no_such_shards"},
        {"task": "vqa", "dataset": "nockpt", "shards": "vqa_shards", "checkpoint": "no/such/export"}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return root, export


def test_suite_writes_json_markdown_and_plot(suite_setup):
    from mlmm.evaluation.suite import run_suite

    root, export = suite_setup
    paths = run_suite(root / "suite.yaml", checkpoint=str(export), out_dir=root / "out", progress=False)
    records = json.loads(Path(paths["json"]).read_text())["results"]
    got = {(r["task"], r["dataset"], r["language"]) for r in records}
    assert {("image-text", "gen", "en"), ("image-text", "gen", "de"), ("vqa", "shapes-vqa", "en"),
            ("vqa", "shapes-vqa", "de"), ("vqa", "shapes-vqa", "fr"), ("image-captioning", "gen", "en"),
            ("image-captioning", "gen", "de")} == got
    for r in records:  # the retrieval record schema
        assert set(r) >= {"task", "dataset", "language", "n", "metrics"} and r["n"] > 0
        assert all(isinstance(v, float) for v in r["metrics"].values())
    vqa = [r for r in records if r["task"] == "vqa"]
    assert all(0 <= r["metrics"]["accuracy"] <= 100 and r["n"] == 12 for r in vqa)
    cap = [r for r in records if r["task"] == "image-captioning"]
    assert all({"BLEU-4", "ROUGE-L", "CIDEr-D", "sacreBLEU", "chrF"} <= set(r["metrics"]) for r in cap)
    md = Path(paths["md"]).read_text()
    for header in ("## retrieval", "## vqa", "## captioning", "### vqa (shapes-vqa)", "| fr |",
                   "tokenised `simple`", "Skipped:", "no_such_shards", "checkpoint no/such/export not found"):
        assert header in md, header
    png = Path(paths["png"]).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_suite_cli_and_bad_config(suite_setup, tmp_path):
    root, export = suite_setup
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"tasks": [{"task": "ranking", "shards": "x"}]}))
    res = subprocess.run([sys.executable, str(REPO / "eval" / "run_suite.py"), "--checkpoint", str(export),
                          "--config", str(bad)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert res.returncode != 0 and "tasks[0].task: must be one of" in res.stderr


def test_suite_configs_in_repo_parse():
    from mlmm.evaluation.suite import load_suite

    configs = sorted((REPO / "eval" / "configs").glob("*.yaml"))
    assert {"demo.yaml", "latin.yaml"} <= {c.name for c in configs}
    for c in configs:
        assert load_suite(c)["tasks"]
