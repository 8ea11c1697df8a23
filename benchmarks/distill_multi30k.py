"""Multi30K cross-lingual retrieval: the distilled student vs its English teacher (MiniLM) used as is.

    python -m benchmarks.distill_multi30k --train runs/m30k [OVERRIDES ...]   # the recipe's one command, timed
    python -m benchmarks.distill_multi30k --export runs/m30k/export             # evaluate an existing export
    python -m benchmarks.distill_multi30k --train runs/dev --dev 300 [OVERRIDES ...]  # choose levers off test

``--train DIR`` runs ``python recipes/train.py --config recipes/configs/multi30k_distill_text.yaml
output_dir=DIR OVERRIDES`` in a subprocess (wall time and load average before / after recorded), then evaluates
DIR/export. ``--dev N`` holds N rows of train_5k out (seed-0 shuffle; the rest is written beside DIR and
passed as ``data.parallel_jsonl``) and evaluates on them instead of test_2016_flickr, so levers are chosen
without looking at the test set.

Both sides of every pair go through the same model and the same code
(:func:`mlmm.evaluation.crosslingual.parallel_text_retrieval`): (a) the student; (b) the teacher used as is
on every language (the baseline distillation must beat). Per language it reports R@1 both ways (L->en,
en->L), their mean, and the student's margin over the teacher; ``target_met`` = margin >= 3 points in every
language. Writes ``benchmarks/results/<--name>.json`` and prints a table.
"""
import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_common import write_result

REPO = Path(__file__).resolve().parents[1]

RECIPE = REPO / "recipes" / "configs" / "multi30k_distill_text.yaml"
DATA = REPO.parent / "shared" / "data" / "multi30k"


def dev_split(train: Path, n: int, out_dir: Path) -> tuple[Path, Path]:
    """(rest, dev) JSONLs: ``n`` rows of ``train`` held out by a seed-0 shuffle."""
    rows = [r for r in train.read_text(encoding="utf-8").splitlines() if r.strip()]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    dev = set(order[:n])
    out_dir.mkdir(parents=True, exist_ok=True)
    rest_path, dev_path = out_dir / f"train_minus_dev{n}.jsonl", out_dir / f"dev{n}.jsonl"
    rest_path.write_text("".join(r + "\n" for i, r in enumerate(rows) if i not in dev), encoding="utf-8")
    dev_path.write_text("".join(r + "\n" for i, r in enumerate(rows) if i in dev), encoding="utf-8")
    return rest_path, dev_path


def train(out_dir: Path, overrides: list[str]) -> dict:
    cmd = [sys.executable, str(REPO / "recipes" / "train.py"), "--config", str(RECIPE), f"output_dir={out_dir}",
           "train.progress=false", *overrides]
    load0, t0 = os.getloadavg(), time.perf_counter()
    subprocess.run(cmd, check=True, cwd=REPO)
    wall = time.perf_counter() - t0
    return {"command": " ".join(cmd[1:]), "wall_seconds": round(wall, 1), "load_average_before": list(load0),
            "load_average_after": list(os.getloadavg()), **train_log(out_dir / "train.log")}


def train_log(path: Path) -> dict:
    """Steps and the seconds from the model line to the last step, from a run's train.log."""
    if not path.is_file():
        return {}
    lines = path.read_text().splitlines()
    stamps = [ln[:8] for ln in lines if re.match(r"\d\d:\d\d:\d\d INFO (model|step)", ln)]
    steps = [int(m.group(1)) for ln in lines if (m := re.search(r"INFO step (\d+) ", ln))]
    if not (stamps and steps):
        return {}
    to_s = lambda s: int(s[:2]) * 3600 + int(s[3:5]) * 60 + int(s[6:8])  # noqa: E731
    return {"steps": steps[-1], "step_seconds": (to_s(stamps[-1]) - to_s(stamps[0])) % 86400,
            "last_log_line": next(ln for ln in reversed(lines) if "INFO step" in ln)}


def summary(student: list[dict], teacher: list[dict]) -> dict:
    """Per language: R@1 both ways and their mean for student and teacher, and the student's margin."""
    t_by = {r["language"]: r["metrics"] for r in teacher}
    out = {}
    for r in student:
        s, t = r["metrics"], t_by[r["language"]]
        out[r["language"].split("-")[0]] = {
            "student": {"L2en_R@1": s["src2tgt_R@1"], "en2L_R@1": s["tgt2src_R@1"], "mean_R@1": s["mean_R@1"]},
            "teacher_as_is": {"L2en_R@1": t["src2tgt_R@1"], "en2L_R@1": t["tgt2src_R@1"], "mean_R@1": t["mean_R@1"]},
            "margin_mean_R@1": round(s["mean_R@1"] - t["mean_R@1"], 2)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", default=None, help="an existing export to evaluate")
    p.add_argument("--train", default=None, metavar="DIR", help="run the recipe into DIR first (timed)")
    p.add_argument("--dev", type=int, default=0, help="hold N train_5k rows out; train on the rest, evaluate on them")
    p.add_argument("--train-jsonl", default=str(DATA / "train_5k.jsonl"))
    p.add_argument("--test", default=str(DATA / "test_2016_flickr.jsonl"))
    p.add_argument("--languages", default="de,fr,cs")
    p.add_argument("--target-language", default="en")
    p.add_argument("--train-log", default=None, help="train.log of an --export run, to record steps and time")
    p.add_argument("--name", default="distill_multi30k", help="results file benchmarks/results/<name>.json")
    p.add_argument("--out", default=None, help="results path (default: from --name)")
    p.add_argument("overrides", nargs="*", help="with --train: recipe overrides, e.g. train.max_steps=100")
    args = p.parse_args(argv)
    if bool(args.export) == bool(args.train):
        p.error("give exactly one of --export and --train")

    from mlmm.distill.teacher import build_teacher
    from mlmm.evaluation import markdown_table
    from mlmm.evaluation.crosslingual import load_student, parallel_text_retrieval, teacher_config_from_export

    overrides, test = list(args.overrides), args.test
    if args.dev:
        rest, test = dev_split(Path(args.train_jsonl), args.dev, Path(args.train or args.export).parent / "dev_split")
        overrides = [f"data.parallel_jsonl={rest}", f"data.train_shards={rest.parent / 'shards'}", *overrides]
    run: dict = {}
    export = Path(args.export) if args.export else Path(args.train) / "export"
    if args.train:
        run = train(Path(args.train), overrides)
    elif args.train_log:
        run = train_log(Path(args.train_log))
    langs = args.languages.split(",")
    dataset = "multi30k-" + (f"train5k-dev{args.dev}" if args.dev else Path(test).stem)
    t0 = time.perf_counter()
    student = parallel_text_retrieval(load_student(export), test, langs, args.target_language, dataset=dataset)
    eval_seconds = time.perf_counter() - t0
    teacher = build_teacher(teacher_config_from_export(export))
    baseline = parallel_text_retrieval(None, test, langs, args.target_language, dataset=dataset,
                                       embed=lambda texts, lang: teacher.encode_text(texts).float())
    table = summary(student, baseline)
    config = json.loads((export / "config.json").read_text(encoding="utf-8")).get("train_config")
    result = {"eval_set": str(test), "summary": table,
              "target_met": all(v["margin_mean_R@1"] >= 3.0 for v in table.values()),
              "student": student, "teacher_as_is": baseline, "train": run,
              "eval_seconds_student": round(eval_seconds, 1),
              "export": str(export), "overrides": overrides, "config": config}
    path = write_result(args.name, result, args.out)
    rows = [{"task": "text-text R@1, student vs teacher as is", "dataset": dataset, "language": k,
             "n": next(r["n"] for r in student if r["language"].startswith(k + "-")),
             "metrics": {"student L→en": v["student"]["L2en_R@1"], "student en→L": v["student"]["en2L_R@1"],
                                        "student mean": v["student"]["mean_R@1"],
                                        "teacher L→en": v["teacher_as_is"]["L2en_R@1"],
                                        "teacher en→L": v["teacher_as_is"]["en2L_R@1"],
                                        "teacher mean": v["teacher_as_is"]["mean_R@1"], "margin": v["margin_mean_R@1"]}}
            for k, v in table.items()]
    print(markdown_table(rows, list(rows[0]["metrics"])))
    print(f"target (margin >= 3 in every language) met: {result['target_met']}; wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
