"""The README's first command, `python -m mlmm.demo`, end to end with a short run: shards -> DeepSpeed training ->
export -> reload -> retrieval per language -> eval suite."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_demo_runs_end_to_end(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}  # the demo is its own 1-process world
    cmd = [sys.executable, "-m", "mlmm.demo", "--out", str(tmp_path / "demo"), "--no-shared",
           "train.max_steps=20", "train.progress=false"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "[4/4]" in res.stdout and "demo finished" in res.stdout
    export = tmp_path / "demo" / "run" / "export"
    assert (export / "model.safetensors").is_file() and (export / "config.json").is_file()
    records = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    langs = {(r["task"], r["language"]) for r in records}
    assert {("image-text", "en"), ("image-text", "de"), ("image-text", "fr")} <= langs
    assert (tmp_path / "demo" / "eval_demo" / "results.md").is_file()
