"""Precompute teacher embeddings into new shards (M-CLIP practice: the student run needs no teacher forward).

    python -m mlmm.distill.precompute --teacher recipes/configs/multi30k_distill_text.yaml \
        --shards data/multi30k/shards --out data/multi30k/shards_minilm

``--teacher`` is a YAML holding either a run config (the teacher of its ``loss``, or of the first ``multi``
term that has one) or a bare teacher mapping (``{kind, arch, model_config, checkpoint, ...}``).
Every input shard is copied to ``OUT`` under the same name with, per sample:

* ``teacher_text.npy``  float32 [K, D]: the teacher's L2-normalised embeddings of the sample's K captions in
  the teacher language (``meta["captions"][language]`` order; absent when K = 0);
* ``teacher_image.npy`` float32 [D]: the image, preprocessed as for evaluation (centre crop, teacher size);
* ``teacher_video.npy`` float32 [D]: mean of the normalised embeddings of ``--frames`` uniformly sampled frames,
  re-normalised;
* the json gains ``"teacher": {"id": <fingerprint>, "language", "dim"}`` (losses refuse other fingerprints).

``OUT/index.json`` is the input's index plus a ``teacher`` entry. The pipeline carries the arrays to
``Batch.extras``; the distillation losses use them when present and run the teacher online otherwise.
The inputs are resolved and the teacher built before ``OUT`` is touched; ``OUT`` (which may only hold ``*.tar`` and
``index.json`` of an earlier run) is replaced as a whole when every shard is written
(:func:`mlmm.atomic.replace_folder`): a failure or a kill leaves it as it was. Samples lost to a corrupt input shard
are logged and counted in ``index.json`` (``input_errors``).
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import yaml
from tqdm import tqdm

from mlmm.atomic import fault, replace_folder
from mlmm.config import ConfigError
from mlmm.typed import from_dict
from mlmm.data.shard_output import UploadError, remote_out, tar_writer
from mlmm.distill.teacher import Teacher, TeacherConfig, build_teacher
from mlmm.modalities import modality as spec_of

log = logging.getLogger(__name__)


def teacher_from_yaml(path: str | Path) -> tuple[TeacherConfig, int]:
    """(teacher config, video frames) from a run config YAML or a bare teacher YAML."""
    from mlmm.registry import LOSSES, build_component_config

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    if "loss" in raw:
        loss = build_component_config(LOSSES, raw["loss"], "loss")
        for cfg in [loss, *getattr(loss, "terms", {}).values()]:
            if getattr(cfg, "teacher", None) is not None:
                return cfg.teacher, int(getattr(cfg, "frames", 4))
        raise ConfigError(f"{path}: loss has no teacher")
    raw = raw.get("teacher", raw)
    return from_dict(TeacherConfig, raw, f"{path}: teacher"), 4


def _npy(array: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array.detach().float().cpu().numpy().astype(np.float32), allow_pickle=False)
    return buf.getvalue()


def embed_samples(teacher: Teacher, samples: list[dict[str, Any]], frames: int) -> list[dict[str, bytes]]:
    """Teacher arrays (``{"teacher_text.npy": bytes, ...}``) of raw samples ``{ext: bytes, "json": dict}``."""
    from mlmm.data.transforms import decode_image, decode_video, image_to_tensor

    out: list[dict[str, bytes]] = [{} for _ in samples]
    lang = teacher.cfg.language
    texts, owners = [], []
    for i, s in enumerate(samples):
        caps = (s["json"].get("captions") or {}).get(lang) or []
        caps = [caps] if isinstance(caps, str) else caps
        texts += caps
        owners += [i] * len(caps)
    if texts:
        z = teacher.encode_text(texts, device=torch.device("cpu"), dtype=torch.float32)  # [sum K, D]
        for i in sorted(set(owners)):
            out[i]["teacher_text.npy"] = _npy(z[[j for j, o in enumerate(owners) if o == i]])
    if not teacher.has_image:
        return out
    size = teacher.image_size
    for modality in ("image", "video"):
        idx, data = [], []
        for i, s in enumerate(samples):
            raw = spec_of(modality).member(s)
            if raw is None:
                continue
            try:
                x = (image_to_tensor(decode_image(raw, draft_size=size), size, False) if modality == "image"
                     else decode_video(raw, frames, size, train=False))
            except ValueError as e:
                log.warning("%s: undecodable %s, no teacher embedding: %s", s["__key__"], modality, e)
                continue
            idx.append(i)
            data.append(x)
        for start in range(0, len(data), teacher.cfg.batch_size):
            x = torch.stack(data[start:start + teacher.cfg.batch_size])
            z = teacher.encode_image(x) if modality == "image" else teacher.encode_video(x)
            for i, row in zip(idx[start:start + teacher.cfg.batch_size], z):
                out[i][f"teacher_{modality}.npy"] = _npy(row)
    return out


@remote_out
def precompute(teacher_cfg: TeacherConfig, shards: str, out_dir: str | Path, frames: int = 4,
               chunk: int = 256, progress: bool = True, teacher: Optional[Teacher] = None,
               on_shard: Optional[Callable[[Path], None]] = None) -> dict:
    """Write ``out_dir`` (shards + index.json) with teacher embeddings, all at once; returns the index. ``out_dir``
    may be a bucket, URL or ``pipe:`` spec (:mod:`mlmm.data.shard_output`, which passes ``on_shard``)."""
    import collections

    from mlmm.data.shards import iter_samples, resolve_shards
    from mlmm.data.shardio import beside, is_local, local_path, read_json, shard_name
    from mlmm.data.write_shards import shard_entry, write_index

    files = resolve_shards(shards)
    out = Path(out_dir)
    if any(is_local(f) and Path(local_path(f)).resolve().parent == out.resolve() for f in files):
        raise ValueError(f"--out {out} must differ from the input shard folder")
    unnamed = [f for f in files if not shard_name(f)]
    if unnamed:
        raise ValueError(f"precompute: cannot name the output of {unnamed[0]!r}: a pipe: command must name its .tar")
    teacher = teacher or build_teacher(teacher_cfg)
    teacher.to("cpu", torch.float32)
    info = {"id": teacher.fingerprint, "language": teacher.cfg.language, "dim": teacher.dim}
    entries, lost, total = [], collections.Counter(), 0
    with replace_folder(out, owned=("*.tar", "index.json"), what="--out") as tmp:
        for shard in tqdm(files, desc="precompute", disable=not progress):
            with tar_writer(tmp / shard_name(shard)) as writer:
                n = 0
                buf: list[dict[str, Any]] = []

                def flush() -> None:
                    nonlocal total
                    for s, arrays in zip(buf, embed_samples(teacher, buf, frames)):
                        sample = {k: v for k, v in s.items() if k not in ("__url__", "json")
                                  and not (k.startswith("teacher_") and k.endswith(".npy"))}
                        meta = {**s["json"], "teacher": info}
                        sample["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
                        writer.write({**sample, **arrays})
                        total += 1
                        fault(f"shard_row:{total}")
                    buf.clear()

                for raw in iter_samples([shard], errors="yield"):
                    if "__error__" in raw:  # the unreadable rest of an input shard: counted, listed, logged
                        lost[raw["__error__"].partition(": ")[0]] += 1
                        log.warning("input %s", raw["__error__"])
                        continue
                    buf.append(raw)
                    n += 1
                    if len(buf) >= chunk:
                        flush()
                flush()
            if on_shard:
                on_shard(tmp / shard_name(shard))
            entries.append(shard_entry(tmp / shard_name(shard), n))
        src_index, index = beside(files[0], "index.json"), {}  # no index beside pipe: inputs
        if src_index and (not is_local(src_index) or Path(src_index).is_file()):
            try:
                index = read_json(src_index)
            except OSError:  # a bucket / server without an index.json beside the shards
                if is_local(src_index):
                    raise
        index.update(shards=entries, n_samples=sum(c["n"] for c in entries), teacher=info,
                     teacher_config=teacher_cfg.__dict__)
        if lost:  # unreadable parts of the input shards: {reason: count}
            index["input_errors"] = dict(sorted(lost.items()))
            log.warning("input shards: %s (listed in %s)", dict(lost), out / "index.json")
        write_index(tmp, index)
    return index


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", required=True, help="YAML: a run config with a distillation loss, or a teacher")
    p.add_argument("--shards", required=True, help="input shards: a folder, glob, brace range, URL or pipe: spec "
                                                   "(mlmm.data.shards.resolve_shards)")
    p.add_argument("--out", required=True, help="output shard folder, or a bucket / URL prefix or pipe:CMD with "
                                               "{name} (mlmm.data.shard_output)")
    p.add_argument("--frames", type=int, default=None, help="video frames (default: the loss's, else 4)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg, frames = teacher_from_yaml(args.teacher)
        index = precompute(cfg, args.shards, args.out, frames=args.frames or frames)
    except (ValueError, FileNotFoundError, FileExistsError, UploadError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{index['n_samples']} samples, teacher {index['teacher']} -> {args.out}")


if __name__ == "__main__":
    main()
