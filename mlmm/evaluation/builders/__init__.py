"""Dataset builders: standard multilingual benchmarks, from files you have, into mlmm eval shards, one command each
(``eval/build_dataset.py <dataset> ...``; the layouts are in each builder's docstring).

    report = build("xtd10", "shards/xtd10", captions="Cross-lingual-Test-Dataset-XTD10", images="coco/train2014")

Builders: XTD10, Multi30K, XM3600, COCO / Flickr30k Karpathy (:mod:`.image_text`); MSR-VTT, Clotho, AudioCaps
(:mod:`.video_audio`); VQAv2 (:mod:`.vqa`); image-folder and CSV classification sets (:mod:`.classification`).
Every path is checked first; a missing file is a one-line error naming it (``--skip-missing`` leaves out items
whose media file is missing and lists them in ``OUT/build.json``). Shards are written by
:func:`mlmm.data.write_shards.write_shards` (``index.json`` beside them); classification sets also get
``classes.yaml`` (class names per language for :mod:`mlmm.evaluation.zeroshot`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from mlmm.evaluation.builders import classification, image_text, vqa, video_audio
from mlmm.evaluation.builders.common import BuildError, write_eval_shards

BUILDERS: dict[str, Callable] = {
    "xtd10": image_text.xtd10, "multi30k": image_text.multi30k, "xm3600": image_text.xm3600,
    "karpathy": image_text.karpathy, "msrvtt": video_audio.msrvtt, "clotho": video_audio.clotho,
    "audiocaps": video_audio.audiocaps, "vqav2": vqa.vqav2, "image-folder": classification.image_folder,
    "csv": classification.csv_set,
}
__all__ = ["BUILDERS", "BuildError", "build"]


def build(name: str, out: str | Path, *, skip_missing: bool = False, shard_size: int = 1000, progress: bool = True,
          **inputs: Any) -> dict[str, Any]:
    """Run builder ``name`` on ``inputs`` (the keyword arguments of its function in :data:`BUILDERS`) and write
    ``out``; -> the build report (``out/build.json``)."""
    if name not in BUILDERS:
        raise BuildError(f"unknown dataset {name!r}; builders: {', '.join(BUILDERS)}")
    result = BUILDERS[name](**{k: v for k, v in inputs.items() if v is not None})
    rows, missing, classes = (result + (None,))[:3]
    report = write_eval_shards(rows, missing, out, name=name, skip_missing=skip_missing, shard_size=shard_size,
                               progress=progress)
    if classes is not None:
        from mlmm.evaluation.prompts import write_classes

        write_classes(out, classes["names"], modality=classes["modality"], ids=classes["ids"])
        report["classes"] = len(classes["ids"])
    return report
