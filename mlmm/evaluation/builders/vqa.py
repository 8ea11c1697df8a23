"""VQAv2 (questions + annotations + COCO images) as mlmm VQA eval shards.

    build("vqav2", questions="v2_OpenEnded_mscoco_val2014_questions.json",
          annotations="v2_mscoco_val2014_annotations.json", images="coco/val2014", out="shards/vqav2_val")

One sample per question: ``{"image", "question": {"en": ...}, "answers": {"en": [10 human answers]},
"question_type", "answer_type", "question_id", "image_id"}``, the format :mod:`mlmm.evaluation.vqa` reads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from mlmm.evaluation.builders.common import BuildError, expected_path, find_media, need_dir, need_file, read_json


def vqav2(questions: str | Path, annotations: str | Path, images: str | Path, limit: Optional[int] = None):
    """VQAv2 questions + annotations JSON + the COCO images (``COCO_<subtype>_<image_id:012d>.jpg``)."""
    qpath, apath = need_file(questions, "VQAv2 questions JSON"), need_file(annotations, "VQAv2 annotations JSON")
    images = need_dir(images, "COCO images")
    qs, ann = read_json(qpath), read_json(apath)
    if not isinstance(qs, dict) or "questions" not in qs:
        raise BuildError(f"{qpath}: expected {{'questions': [...]}} (v2_OpenEnded_mscoco_*_questions.json)")
    if not isinstance(ann, dict) or "annotations" not in ann:
        raise BuildError(f"{apath}: expected {{'annotations': [...]}} (v2_mscoco_*_annotations.json)")
    subtype = str(qs.get("data_subtype") or ann.get("data_subtype") or "val2014")
    by_id = {a["question_id"]: a for a in ann["annotations"]}
    rows, missing = [], []
    for q in qs["questions"][:limit]:
        a = by_id.get(q["question_id"])
        if a is None:
            raise BuildError(f"{apath}: no annotation for question_id {q['question_id']} of {qpath}")
        name = f"COCO_{subtype}_{int(q['image_id']):012d}.jpg"
        image = find_media(images, name, ("", subtype))
        if image is None:
            missing.append(expected_path(images, name, ("", subtype)))
            continue
        rows.append({"key": f"q{q['question_id']}", "image": str(image.resolve()),
                     "question": {"en": q["question"]}, "answers": {"en": [x["answer"] for x in a["answers"]]},
                     "question_type": a.get("question_type"), "answer_type": a.get("answer_type"),
                     "question_id": q["question_id"], "image_id": q["image_id"], "source": "vqav2"})
    return rows, missing
