"""Shared by tests/test_ascl.py, test_vse.py, test_mvsen.py: the attribute-scene data and the tiny runs.

One data set and one plain-InfoNCE baseline per (process, steps): the baseline is trained once and reused by
the three beats-InfoNCE tests of a pytest session (``functools.lru_cache``).
"""
from __future__ import annotations

import functools
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
# distractor types of the CI checks: colour swapped, "striped" inserted for a plain object (text says more than the
# image). Size is at chance for every recipe after 80 steps (the tiny ViT has not learnt it yet) and shape even after
# 400, so the slow runs add size and the reports list every type (docs/methods_vse_family.md).
DISTRACTOR_TYPES = ("color", "insert")
SLOW_TYPES = ("size", "color", "insert")
BASELINE = ("tiny_clip.yaml", ("model.video=null", "model.audio=null", "loss.pairs=[[image,text]]"))


@functools.lru_cache(maxsize=None)
def attribute_data(n_train: int = 384, n_test: int = 64) -> Path:
    """Attribute scenes (mlmm.synthetic.scenes) -> shards + test shards + tokenizer in a temp folder."""
    from mlmm.synthetic.scenes import attribute_scenes

    return _scene_data(attribute_scenes, "mlmm_attr_", n_train, n_test)


def _scene_data(generate, prefix: str, n_train: int, n_test: int) -> Path:
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards

    root = Path(tempfile.mkdtemp(prefix=prefix))
    rows = generate(root / "train", n=n_train, size=32, seed=0)
    generate(root / "test", n=n_test, size=32, seed=1, prefix="test")
    write_shards(root / "train" / "manifest.jsonl", root / "shards", shard_size=64, progress=False)
    write_shards(root / "test" / "manifest.jsonl", root / "test_shards", shard_size=200, progress=False)
    train_tokenizer([c for r in rows for cs in r["captions"].values() for c in cs], root / "tok", vocab_size=200)
    return root


def overrides(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}", f"output_dir={out}",
            f"train.ds_config={REPO / 'ds_config.json'}", "train.progress=false", "train.resume=never",
            "train.log_every=1000", *extra]


def train_and_evaluate(recipe: str, data: Path, steps: int, *extra: str, types=DISTRACTOR_TYPES,
                       distractors: bool = True) -> dict:
    """Train ``recipe`` for ``steps`` (same seed, data and batch size for every recipe) and evaluate on the test shards.

    Returns ``{"global": distractor metrics (``types``) with the cosine, "head": ... with the head's pair score (if
    any), "all": every distractor type with the cosine,
    "rsum": mean rSum over en/de/fr, "rsum_rerank": the same after re-ranking the top 10 with the head,
    "seconds": training time}``.
    """
    from mlmm.config import load_config
    from mlmm.evaluation.fine_grained import distractor_accuracy
    from mlmm.evaluation.rerank import find_interaction_head
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.training import Trainer

    out = Path(tempfile.mkdtemp(prefix="mlmm_run_"))
    cfg = load_config(CONFIGS / recipe, overrides(data, out, f"train.max_steps={steps}", *extra))
    t0 = time.perf_counter()
    trainer = Trainer(cfg).setup()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.cleanup()
    model = trainer.model.eval()
    test = str(data / "test_shards")
    head = find_interaction_head(model, "image")
    res: dict = {"seconds": seconds}
    if distractors:
        res.update({"global": distractor_accuracy(model, test, types=types), "all": distractor_accuracy(model, test)})
        if head is not None:
            res["head"] = distractor_accuracy(model, test, types=types, head=head)
    records = evaluate_retrieval(model, test, progress=False, rerank_topk=10 if head is not None else 0)
    for key, task in (("rsum", "image-text"), ("rsum_rerank", "image-text+rerank@10")):
        vals = [r["metrics"]["rsum"] for r in records if r["task"] == task]
        if vals:
            res[key] = sum(vals) / len(vals)
    return res


@functools.lru_cache(maxsize=None)
def baseline(steps: int, n_train: int = 384, types=DISTRACTOR_TYPES) -> dict:
    """Plain InfoNCE (tiny_clip, image + text only) on the same data, steps, seed and batch size."""
    recipe, extra = BASELINE
    return train_and_evaluate(recipe, attribute_data(n_train), steps, "data.batch_size=32", *extra, types=types)


OBJECT_STEPS = 150


@functools.lru_cache(maxsize=None)
def object_data(n_train: int = 600, n_test: int = 96) -> Path:
    """Two-object scenes whose captions name both objects ("a red circle and a blue square", both orders)
    -> shards + test shards + tokenizer."""
    from mlmm.synthetic.scenes import object_scenes

    return _scene_data(functools.partial(object_scenes, n_objects=(2,), describe="all"), "mlmm_obj_", n_train, n_test)


@functools.lru_cache(maxsize=None)
def object_baseline(steps: int = OBJECT_STEPS) -> dict:
    """Plain InfoNCE on the object scenes (same seed, batch and steps as the VSE / MVSEN runs)."""
    recipe, extra = BASELINE
    return train_and_evaluate(recipe, object_data(), steps, "data.batch_size=32", *extra, distractors=False)


def run_main(recipe: str, data: Path, out: Path, steps: int = 3) -> int:
    """``recipes/train.py`` main() in-process for a few steps (the code path `deepspeed recipes/train.py` runs).

    main() tears the process group down at exit; here that is replaced by a barrier so that later trainers of the
    same pytest process keep working (DeepSpeed caches groups that a destroyed group would leave dangling).
    """
    import importlib.util
    from unittest import mock

    from mlmm.training import distributed

    spec = importlib.util.spec_from_file_location("mlmm_train_recipe", REPO / "recipes" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = ["--config", str(CONFIGS / recipe), *overrides(data, out, f"train.max_steps={steps}", "train.log_every=1")]
    with mock.patch.object(distributed, "cleanup", distributed.barrier):
        return mod.main(argv)
