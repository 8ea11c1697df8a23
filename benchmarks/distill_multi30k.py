"""Multi30K cross-lingual retrieval of a distilled student vs its English teacher (MiniLM) applied directly.

    python benchmarks/distill_multi30k.py --export runs/multi30k_distill_text/export \
        [--test ../shared/data/multi30k/test_2016_flickr.jsonl] [--languages de,fr,cs] [--train-log TRAIN.log]

Scores text(L) -> text(en) and back on test_2016_flickr (1000 parallel captions; chance R@1 = 0.1 %) for
(a) the student (mlmm export; every language through the student) and (b) the teacher used as is on every
language (baseline: how much an English-only encoder already transfers). Writes
``benchmarks/results/distill_multi30k.json`` ({"student": records, "teacher_baseline": records, "train": {...}})
and prints both tables.
"""
import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--export", required=True)
    p.add_argument("--test", default=str(REPO.parent / "shared" / "data" / "multi30k" / "test_2016_flickr.jsonl"))
    p.add_argument("--languages", default="de,fr,cs")
    p.add_argument("--target-language", default="en")
    p.add_argument("--train-log", default=None, help="train.log of the run, to record steps and wall time")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "distill_multi30k.json"))
    args = p.parse_args(argv)

    from mlmm.distill.teacher import build_teacher
    from mlmm.evaluation import markdown_table
    from mlmm.evaluation.crosslingual import load_student, parallel_text_retrieval, teacher_config_from_export

    langs = args.languages.split(",")
    t0 = time.perf_counter()
    student = load_student(args.export)
    records = parallel_text_retrieval(student, args.test, langs, args.target_language, dataset="multi30k-test2016")
    t_student = time.perf_counter() - t0
    teacher = build_teacher(teacher_config_from_export(args.export))
    baseline = parallel_text_retrieval(None, args.test, langs, args.target_language, dataset="multi30k-test2016",
                                       embed=lambda texts, lang: teacher.encode_text(texts).float())
    train = {}
    if args.train_log and Path(args.train_log).is_file():
        lines = Path(args.train_log).read_text().splitlines()
        stamps = [ln[:8] for ln in lines if re.match(r"\d\d:\d\d:\d\d INFO (model|step)", ln)]
        steps = [int(m.group(1)) for ln in lines if (m := re.search(r"INFO step (\d+) ", ln))]
        if stamps and steps:
            to_s = lambda s: int(s[:2]) * 3600 + int(s[3:5]) * 60 + int(s[6:8])  # noqa: E731
            train = {"steps": steps[-1], "wall_seconds_after_setup": (to_s(stamps[-1]) - to_s(stamps[0])) % 86400,
                     "last_log_line": next(ln for ln in reversed(lines) if "INFO step" in ln)}
    out = {"student": records, "teacher_baseline": baseline, "train": train, "eval_seconds_student": t_student,
           "export": str(args.export), "test": str(args.test)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    cols = ["src2tgt_R@1", "src2tgt_R@10", "tgt2src_R@1", "tgt2src_R@10", "chance_src2tgt_R@1", "chance_src2tgt_R@10"]
    print("## student (distilled)\n" + markdown_table(records, cols))
    print("## teacher applied directly (baseline)\n" + markdown_table(baseline, cols))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
