"""Training checkpoints: DeepSpeed state + ``mlmm_state.json`` (step, data position, run record, file fingerprint)
+ per-rank RNG state.

Layout: ``<output_dir>/checkpoints/step_00000050/`` (DeepSpeed files, ``rng/rank_<r>.json`` per rank
(:mod:`mlmm.training.rng`, JSON: no pickle) and mlmm_state.json) and ``<output_dir>/checkpoints/latest`` naming the
newest complete checkpoint. Which checkpoint a run resumes, and whether it may, is decided by
:mod:`mlmm.training.resume` before :func:`load` runs.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

from mlmm.atomic import fault as _fault  # noqa: F401 (the trainer's test hook: checkpoint._fault)
from mlmm.atomic import fsync_dir as _fsync_dir, fsync_tree as _fsync_tree, write_atomic as _write_atomic
from mlmm.training import fingerprint, rng
from mlmm.training.errors import CheckpointRefused

STATE_NAME = fingerprint.STATE_NAME


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@contextlib.contextmanager
def _recording_writes(engine):
    """The files DeepSpeed's checkpoint engine writes in this process during the block (a list of paths)."""
    written: list[Path] = []
    ckpt_engine = engine.checkpoint_engine
    real_save = ckpt_engine.save

    def save(state_dict, path, *args, **kwargs):
        real_save(state_dict, path, *args, **kwargs)
        written.append(Path(path))

    ckpt_engine.save = save
    try:
        yield written
    finally:
        ckpt_engine.save = real_save


def _fsync_files(paths) -> None:
    """fsync files and then their folders (their directory entries)."""
    for p in paths:
        with open(p, "rb") as f:
            os.fsync(f.fileno())
    for d in sorted({Path(p).parent for p in paths}):
        _fsync_dir(d)


def save(engine, root: str | Path, step: int, state: dict[str, Any], keep: int = 2, is_main: bool = True) -> Path:
    """Save a checkpoint for `step` atomically; `state` (JSON-able) goes to mlmm_state.json. Collective call.

    Every rank writes into ``<tag>.tmp`` (DeepSpeed's files and its own ``rng/rank_<r>.json``) and fsyncs the files
    it wrote itself: on a shared filesystem only the node that wrote a file can flush it. After a barrier rank 0
    writes mlmm_state.json, renames the folder to ``<tag>`` and only then rewrites ``latest`` (itself via a temp
    file + rename). A crash at any point leaves the previous checkpoint and ``latest`` intact; stale ``*.tmp``
    folders are removed on the next save.
    """
    import torch.distributed as dist

    root = Path(root)
    tag = tag_for(step)
    tmp = f"{tag}.tmp"
    if (root / tag / STATE_NAME).is_file() and latest_tag(root) == tag:  # saved already (e.g. resumed at max_steps)
        return root / tag
    # a complete step_N that `latest` does not name (a run killed between the rename and `latest`) is from before the
    # resume: it is saved again below, from this run's state, and only then named by `latest`
    if is_main:
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    with _recording_writes(engine) as written:
        engine.save_checkpoint(str(root), tag=tmp, client_state={"mlmm": state}, save_latest=False)
    written.append(rng.save(root / tmp, _rank()))
    if is_main and (root / tmp / "zero_to_fp32.py").is_file():  # DeepSpeed's recovery script, copied by rank 0
        written.append(root / tmp / "zero_to_fp32.py")
    _fsync_files(written)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    if is_main:
        _fault(f"after_weights:{step}")
        files = fingerprint.manifest(root / tmp)  # every file of the folder (all ranks wrote theirs by now)
        _write_atomic(root / tmp / STATE_NAME, json.dumps({"step": step, **state, "files": files}, indent=2))
        _fsync_dir(root / tmp)  # (each rank fsynced the files it wrote before the barrier)
        if (root / tag).exists():  # an incomplete folder of this step (no mlmm_state.json): not loadable
            shutil.rmtree(root / tag)
        os.replace(root / tmp, root / tag)
        _fsync_dir(root)
        _fault(f"before_latest:{step}")
        _write_atomic(root / "latest", tag)
        _fsync_dir(root)
        prune(root, keep)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return root / tag


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (never the one `latest` names)."""
    if keep <= 0:
        return
    latest = latest_tag(root)
    tags = sorted(p.name for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for t in tags[:-keep]:
        if t != latest:
            shutil.rmtree(root / t, ignore_errors=True)


def latest_tag(root: str | Path) -> Optional[str]:
    f = Path(root) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (Path(root) / tag / STATE_NAME).is_file() else None


UNIVERSAL_FILES = "mlmm_files.json"  # the fingerprint of a universal checkpoint folder mlmm converted


def _universal_sound(out: Path) -> bool:
    """Did mlmm convert `out`, and is all of it still there? (Otherwise it is converted again.)"""
    try:
        fingerprint.check_files(out, json.loads((out / UNIVERSAL_FILES).read_text()), exclude=UNIVERSAL_FILES)
    except (OSError, ValueError, fingerprint.Damaged, fingerprint.Untrusted):
        return False
    return True


def to_universal(root: str | Path, tag: str, is_main: bool = True) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once; collective call).

    A ZeRO-1/2/3 checkpoint stores optimizer state partitioned over the data-parallel ranks that
    wrote it; the universal format stores every parameter whole (fp32 weights + Adam moments), so
    any world size can load it. Written to ``<root>/universal/<tag>`` through a temp folder.
    """
    import argparse
    import contextlib
    import io

    import torch.distributed as dist

    out = Path(root) / "universal" / tag
    if is_main and not _universal_sound(out):
        shutil.rmtree(out, ignore_errors=True)
        from deepspeed.checkpoint import ds_to_universal

        tmp = out.with_name(tag + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        args = argparse.Namespace(input_folder=str(Path(root) / tag), output_folder=str(tmp), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
            ds_to_universal.main(args)
        _write_atomic(tmp / UNIVERSAL_FILES, json.dumps(fingerprint.manifest(tmp, exclude=UNIVERSAL_FILES)))
        _fsync_tree(tmp)
        os.replace(tmp, out)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return out


def load(engine, root: str | Path, tag: str, world_size: int = 1, is_main: bool = True) -> dict[str, Any]:
    """Load checkpoint `tag` into `engine`; returns its mlmm state. Collective call.

    `tag` was chosen and its files checked against their fingerprint by :func:`mlmm.training.resume.plan`; a
    failure to load it now is an incompatibility (e.g. another model shape under ``train.resume=force``) and
    raises :class:`CheckpointRefused`. A ZeRO checkpoint written by a different number of processes is first
    converted to DeepSpeed's universal format (:func:`to_universal`) and loaded from there, optimizer moments
    included.
    """
    root = Path(root)
    state = fingerprint.read_state(root / tag)
    saved_world = int(state.get("world_size", world_size))
    load_dir = root
    universal = saved_world != world_size and engine.zero_optimization_stage() > 0
    try:
        if universal:
            load_dir = to_universal(root, tag, is_main).parent
            engine._config.load_universal_checkpoint = True  # DeepSpeed reads this flag at load time only
        path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    except Exception as e:  # noqa: BLE001 (re-raised as a one-line refusal, chained)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointRefused(f"{root / tag}: DeepSpeed could not load it ({type(e).__name__}: {first[:300]})") from e
    finally:
        engine._config.load_universal_checkpoint = False
    if path is None:
        raise CheckpointRefused(f"{root / tag}: DeepSpeed could not load this checkpoint")
    state["rng"] = rng.restore(root / tag, _rank(), state.get("seed", 0), state["step"], client.get("rng"))
    if universal:
        state["resharded_from"] = saved_world
    return state
