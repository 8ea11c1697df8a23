"""A small multilingual VQA set over procedurally drawn scenes (en / de / fr), in the mlmm manifest format.

    python -m mlmm.synthetic.vqa --out data/vqa --n-images 400 --questions-per-image 3

Scenes: 1-3 objects, each a distinct colour and a distinct shape, in distinct cells of a 2x2 grid over a grey
background (drawn with :func:`mlmm.synthetic.shapes.draw_shape`). Question types (VQAv2 answer types in brackets):
``color`` "What color is the circle?" (other), ``shape`` "What shape is the red object?" (other), ``count``
"How many shapes are there?" (number), ``position`` "Is the red circle on the left or on the right?" (other),
``exists`` "Is there a blue square?" (yes/no). Every question is asked in every language.

Each question has 10 simulated human answers per language with some disagreement: every annotator is right with
a per-question probability in [0.6, 0.95], otherwise gives another answer of the same type; English annotators
also write surface variants ("Two", "red.", "a circle"). Stored ``answers`` are normalised as the official VQA
evaluation normalises (as in the VQAv2 annotation files); ``answers_raw`` keeps what the annotators "wrote".

Row: ``{"key", "image", "question": {lang: str}, "answers": {lang: [10]}, "answers_raw": {...},
"question_type", "answer_type", "scene": [[color, shape, cell], ...]}``; a matching training config sets
``data.text_field: question``.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from mlmm.data.write_shards import write_manifest
from mlmm.synthetic.shapes import COLORS, SHAPES, _background, draw_shape
from mlmm.evaluation.vqa import normalize_answer

LANGUAGES = ("en", "de", "fr")
QUESTION_TYPES = ("color", "shape", "count", "position", "exists")
ANSWER_TYPES = {"color": "other", "shape": "other", "count": "number", "position": "other", "exists": "yes/no"}
YES_NO = {"en": ("yes", "no"), "de": ("ja", "nein"), "fr": ("oui", "non")}
SIDES = {"en": ("left", "right"), "de": ("links", "rechts"), "fr": ("gauche", "droite")}
NUMBER_WORDS_EN = {1: "one", 2: "two", 3: "three"}
CELLS = ((0, 0), (1, 0), (0, 1), (1, 1))  # (column, row); column 0 = left half


def color_word(color: str, lang: str) -> str:
    return {"en": color, "de": COLORS[color][1], "fr": COLORS[color][2]}[lang]


def shape_word(shape: str, lang: str) -> str:
    return {"en": shape, "de": SHAPES[shape][0], "fr": SHAPES[shape][2]}[lang]


def _de_article(shape: str, case: str) -> str:
    masc = SHAPES[shape][1] == "m"
    return {"nom": "der" if masc else "das", "acc_indef": "einen" if masc else "ein"}[case]


def question_text(qtype: str, lang: str, color: str = "", shape: str = "") -> str:
    c, s = (color_word(color, lang) if color else ""), (shape_word(shape, lang) if shape else "")
    if lang == "en":
        return {"color": f"What color is the {shape}?", "shape": f"What shape is the {color} object?",
                "count": "How many shapes are there?",
                "position": f"Is the {color} {shape} on the left or on the right?",
                "exists": f"Is there a {color} {shape}?"}[qtype]
    if lang == "de":
        if qtype == "color":
            return f"Welche Farbe hat {_de_article(shape, 'nom')} {s}?"
        if qtype == "shape":
            return f"Welche Form hat das {c}e Objekt?"
        if qtype == "count":
            return "Wie viele Formen gibt es?"
        if qtype == "position":
            return f"Ist {_de_article(shape, 'nom')} {c}e {s} links oder rechts?"
        ending = "en" if SHAPES[shape][1] == "m" else "es"
        return f"Gibt es {_de_article(shape, 'acc_indef')} {c}{ending} {s}?"
    return {"color": f"De quelle couleur est le {s} ?", "shape": f"Quelle est la forme de l'objet {c} ?",
            "count": "Combien de formes y a-t-il ?", "position": f"Le {s} {c} est-il à gauche ou à droite ?",
            "exists": f"Y a-t-il un {s} {c} ?"}[qtype]


def answer_pool(qtype: str, lang: str) -> list[str]:
    if qtype == "color":
        return [color_word(c, lang) for c in COLORS]
    if qtype == "shape":
        return [shape_word(s, lang) for s in SHAPES]
    if qtype == "count":
        return ["1", "2", "3"]
    if qtype == "position":
        return list(SIDES[lang])
    return list(YES_NO[lang])


def true_answer(qtype: str, lang: str, scene: list, target: dict) -> str:
    if qtype == "color":
        return color_word(target["color"], lang)
    if qtype == "shape":
        return shape_word(target["shape"], lang)
    if qtype == "count":
        return str(len(scene))
    if qtype == "position":
        return SIDES[lang][target["cell"][0]]
    return YES_NO[lang][0 if target["present"] else 1]


def surface_variant(answer: str, lang: str, qtype: str, rng: np.random.Generator) -> str:
    """What an annotator might type for ``answer``: normalisation maps it back."""
    if lang != "en" or rng.random() > 0.3:
        return answer
    if qtype == "count" and answer.isdigit():
        return NUMBER_WORDS_EN[int(answer)].capitalize() if rng.random() < 0.5 else NUMBER_WORDS_EN[int(answer)]
    choice = rng.integers(3)
    if choice == 0 or qtype in ("exists", "count"):
        return answer.capitalize()
    if choice == 1:
        return answer + "."
    return f"the {answer}" if qtype in ("color", "position") else f"a {answer}"


def human_answers(qtype: str, lang: str, truth: str, rng: np.random.Generator, n: int = 10) -> list[str]:
    p_right = rng.uniform(0.6, 0.95)
    pool = [a for a in answer_pool(qtype, lang) if a != truth]
    out = []
    for _ in range(n):
        ans = truth if rng.random() < p_right else pool[rng.integers(len(pool))]
        out.append(surface_variant(ans, lang, qtype, rng))
    return out


def draw_scene(rng: np.random.Generator, size: int) -> tuple[Any, list[dict]]:
    n = int(rng.integers(1, 4))
    colors = rng.choice(list(COLORS), n, replace=False)
    shapes = rng.choice(list(SHAPES), n, replace=False)
    cells = rng.choice(len(CELLS), n, replace=False)
    img = _background(rng, size)
    scene = []
    half = size / 2
    for color, shape, cell in zip(colors, shapes, cells):
        col, row = CELLS[int(cell)]
        radius = rng.uniform(0.15, 0.2) * size
        cx = col * half + rng.uniform(radius, half - radius)
        cy = row * half + rng.uniform(radius, half - radius)
        img = np.asarray(draw_shape(img, str(shape), str(color), cx, cy, radius))
        scene.append({"color": str(color), "shape": str(shape), "cell": (col, row)})
    from PIL import Image

    return Image.fromarray(img), scene


def make_question(qtype: str, scene: list[dict], rng: np.random.Generator) -> tuple[dict, dict]:
    """(target, slots) for a question of ``qtype`` about ``scene``."""
    if qtype == "count":
        return {}, {}
    if qtype == "exists":
        if rng.random() < 0.5:
            obj = scene[rng.integers(len(scene))]
            return {"present": True}, {"color": obj["color"], "shape": obj["shape"]}
        present = {(o["color"], o["shape"]) for o in scene}
        absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
        c, s = absent[rng.integers(len(absent))]
        return {"present": False}, {"color": c, "shape": s}
    obj = scene[rng.integers(len(scene))]
    slots = {"color": {"shape": obj["shape"]}, "shape": {"color": obj["color"]},
             "position": {"color": obj["color"], "shape": obj["shape"]}}[qtype]
    return obj, slots


def generate_vqa(out_dir: str | Path, n_images: int = 400, questions_per_image: int = 3, size: int = 64,
                 seed: int = 0, languages=LANGUAGES, progress: bool = True) -> list[dict[str, Any]]:
    """Write ``images/*.jpg`` and ``manifest.jsonl``; return the rows (one per question)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in tqdm(range(n_images), desc="vqa scenes", disable=not progress):
        img, scene = draw_scene(rng, size)
        name = f"images/vqa-{i:06d}.jpg"
        img.save(out / name, quality=92)
        qtypes = rng.choice(QUESTION_TYPES, min(questions_per_image, len(QUESTION_TYPES)), replace=False)
        for j, qtype in enumerate(qtypes):
            target, slots = make_question(str(qtype), scene, rng)
            question, raw, answers = {}, {}, {}
            for lang in languages:
                question[lang] = question_text(str(qtype), lang, **slots)
                truth = true_answer(str(qtype), lang, scene, target)
                raw[lang] = human_answers(str(qtype), lang, truth, rng)
                answers[lang] = [normalize_answer(a) for a in raw[lang]]
            rows.append({"key": f"vqa-{i:06d}-{j}", "image": name, "question": question, "answers": answers,
                         "answers_raw": raw, "question_type": str(qtype), "answer_type": ANSWER_TYPES[str(qtype)],
                         "scene": [[o["color"], o["shape"], list(o["cell"])] for o in scene]})
    write_manifest(rows, out / "manifest.jsonl")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Generate a multilingual VQA set over drawn scenes.")
    p.add_argument("--out", required=True)
    p.add_argument("--n-images", type=int, default=400)
    p.add_argument("--questions-per-image", type=int, default=3)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    rows = generate_vqa(args.out, args.n_images, args.questions_per_image, args.size, args.seed)
    print(f"wrote {len(rows)} questions -> {Path(args.out) / 'manifest.jsonl'}")


if __name__ == "__main__":
    main()
