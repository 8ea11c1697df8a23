"""Evaluation at scale (issue 20 part 4) and its skip counts (issue 18 part 4): test sets stream (decoded in loader
workers, embeddings kept, media not), bad samples are skipped and counted per reason in the results JSON, and under
torchrun 2 gloo ranks split the shards and give exactly the single-process results."""
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

import eval_zoo  # tests/ is on sys.path under pytest (its default "prepend" import mode)

REPO = Path(__file__).resolve().parents[1]
EXPECTED_SKIPS = {"undecodable image": 1, "bad json": 1, "no image": 1, "truncated shard": 1}


def bad_shard(path: Path, good_jpg: bytes) -> Path:
    """A shard with one good sample, then: garbage image bytes, invalid JSON, only an unknown extension, and a last
    member cut in half (a truncated tar)."""
    def member(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    ok = json.dumps({"captions": {"en": ["a good sample"]}}).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for key, ext, data in (("good", "jpg", good_jpg), ("good", "json", ok),
                               ("garbage", "jpg", b"\xff\xd8 not a jpeg"), ("garbage", "json", ok),
                               ("badjson", "jpg", good_jpg), ("badjson", "json", b"{not json"),
                               ("nomedia", "txt", b"hello"), ("nomedia", "json", ok),
                               ("cut", "json", ok), ("cut", "jpg", good_jpg)):
            member(tar, f"{key}.{ext}", data)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        last = tar.getmembers()[-1]
    path.write_bytes(raw[: last.offset_data + last.size // 2])  # cut inside the last member's data
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    rows = eval_zoo.build_shards(root, n_images=18)
    run = eval_zoo.mlmm_run(root)
    good = (root / "gen" / rows[0]["image"]).read_bytes()
    shards = sorted(str(p) for p in (root / "shards").glob("*.tar")) + [str(bad_shard(root / "bad.tar", good))]
    suite = {"name": "scale", "tasks": [
        {"task": "retrieval", "dataset": "shapes", "shards": ",".join(shards), "languages": ["en", "de"]},
        {"task": "zeroshot", "dataset": "shapes", "shards": ",".join(shards), "classes": "shapes",
         "prompts": [str(eval_zoo.shapes_prompts(root / "prompts.yaml"))]}]}
    (root / "suite.yaml").write_text(yaml.safe_dump(suite))
    return {"root": root, "rows": rows, "run": run, "shards": shards}


def test_stream_keeps_embeddings_not_media_and_counts_skips(data):
    from mlmm.evaluation.models import load_model
    from mlmm.evaluation.stream import captions_of, embed_test_set

    model = load_model(str(data["run"]))
    one = embed_test_set(model, data["shards"], ["image"], keep=captions_of(["en"]), batch_size=4, progress=False)
    assert one.skipped == EXPECTED_SKIPS
    assert len(one.keys) == 18 + 1 and one.keys[-1] == "good"  # the generated images, then the good bad-shard one
    assert one.emb["image"].shape == (19, 16) and not hasattr(one, "media")
    assert set(one.meta[0]) == {"captions"} and set(one.meta[0]["captions"]) == {"en"}
    two = embed_test_set(model, data["shards"], ["image"], keep=captions_of(["en"]), batch_size=5, num_workers=2,
                         progress=False)  # decoded in 2 loader workers, in another order: same set
    assert two.keys == one.keys and two.skipped == one.skipped and two.meta == one.meta
    assert (two.emb["image"] - one.emb["image"]).abs().max() < 1e-6


def test_skip_counts_reach_the_results_json(data, tmp_path):
    from mlmm.evaluation.suite import run_suite

    paths = run_suite(data["root"] / "suite.yaml", model=str(data["run"]), out_dir=tmp_path, progress=False)
    records = json.loads(Path(paths["json"]).read_text())["results"]
    assert {r["task"] for r in records} == {"image-text", "zeroshot_classification"}
    for r in records:
        want = dict(EXPECTED_SKIPS, **({"no label": 1} if r["task"] == "zeroshot_classification" else {}))
        assert r["skipped"] == want, r  # the good sample of the bad shard has no class: counted, not classified
        assert r["model"] == "mlmm:tiny" and r["pretrained"] == str(data["run"])


def test_two_gloo_ranks_equal_one_process(data, tmp_path):
    """torchrun --nproc_per_node 2: each rank reads half the shards, encodes them, the embeddings are gathered;
    results.json equals the single-process run (2 loader workers) exactly, skip counts included."""
    run_suite = REPO / "eval" / "run_suite.py"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    dist = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(run_suite), "--model", str(data["run"]), "--config", str(data["root"] / "suite.yaml"),
                           "--out", str(tmp_path / "dist"), "--workers", "1"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert dist.returncode == 0, dist.stderr[-3000:]
    from mlmm.evaluation.suite import run_suite as run_in_process

    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank (OMP_NUM_THREADS=1): the same kernels, so bitwise-equal embeddings
    try:
        run_in_process(data["root"] / "suite.yaml", model=str(data["run"]), out_dir=tmp_path / "single", workers=2,
                       progress=False)  # one process, decoding in 2 loader workers
    finally:
        torch.set_num_threads(threads)
    a = json.loads((tmp_path / "dist" / "results.json").read_text())["results"]
    b = json.loads((tmp_path / "single" / "results.json").read_text())["results"]
    assert len(a) == 5 and a == b  # retrieval en/de + zero-shot en/de/fr, metrics and skip counts identical


def test_vqa_loader_counts_what_it_leaves_out(data):
    from collections import Counter

    import mlmm
    from mlmm.data.preprocess import Preprocessor
    from mlmm.evaluation.vqa import load_vqa_items

    model = mlmm.from_pretrained(data["run"])
    skipped = Counter()
    items = load_vqa_items(data["shards"], Preprocessor(model.cfg, model.tokenizer, train=False), "image",
                           skipped=skipped)
    assert items == [] and skipped == {"no question": 18 + 3, "bad json": 1, "truncated shard": 1}  # counted, no crash
