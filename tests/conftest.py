import os

import pytest


def pytest_collection_modifyitems(config, items):
    """`slow` tests run only on request (MLMM_RUN_SLOW=1), locally and in CI alike."""
    if os.environ.get("MLMM_RUN_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow test: set MLMM_RUN_SLOW=1 to run")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


def import_benchmark(name):
    """The module ``benchmarks/<name>.py`` (a package: the repo root is on pytest's ``pythonpath``)."""
    import importlib

    return importlib.import_module(f"benchmarks.{name}")


def build_tiny_data(root, *, n_images, n_videos, n_audio, shard_size, seed, vocab_size=300):
    """Generated samples -> ``root/shards`` + a BPE tokenizer in ``root/tok`` (trained on their captions)."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards

    rows = generate(root / "gen", n_images=n_images, n_videos=n_videos, n_audio=n_audio, size=32, seed=seed,
                    progress=False)
    write_shards(root / "gen" / "manifest.jsonl", root / "shards", shard_size=shard_size, progress=False)
    train_tokenizer((c for r in rows for caps in r["captions"].values() for c in caps), root / "tok",
                    vocab_size=vocab_size)
    return root


def tiny_clip_losses(overrides, output_dir):
    """Train ``recipes/configs/tiny_clip.yaml`` with ``overrides`` (``key=value`` strings) into ``output_dir``;
    -> the logged loss of every ``train.log_every`` step."""
    from pathlib import Path

    from mlmm.config import load_config
    from mlmm.training import Trainer

    recipe = Path(__file__).resolve().parents[1] / "recipes" / "configs" / "tiny_clip.yaml"
    trainer = Trainer(load_config(recipe, [*overrides, f"output_dir={output_dir}"])).setup()
    try:
        return [h["loss"] for h in trainer.train()]
    finally:
        trainer.cleanup()
