"""The tiny end-to-end job: make shards -> pretrain with DeepSpeed -> export -> evaluate per language.

    python -m mlmm.demo                 # writes runs/demo/, about 2 minutes on 2 CPU cores

Data: procedurally generated shapes / moving shapes / tones with en/de/fr captions (always), plus
the real samples in ../shared/data when that folder exists (Vietnamese photo captions, spoken
digits with en/de/fr/es captions, MSR-VTT clips). Held out for evaluation: 20 % of the generated
items, the last 40 photos, and every recording of one FSDD speaker (an unseen voice). The five
real clips are too few to hold out and are used for training only.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Optional


REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "recipes" / "configs" / "demo.yaml"
DEFAULT_SHARED = REPO.parent / "shared" / "data"
HELD_OUT_SPEAKER = "theo"


def split_generated(rows: list[dict], test_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    test = set(order[: int(len(rows) * test_fraction)])
    return [r for i, r in enumerate(rows) if i not in test], [r for i, r in enumerate(rows) if i in test]


def split_shared(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    photos = sorted(r["key"] for r in rows if r["key"].startswith("vi-"))
    held = set(photos[-40:])
    test = [r["key"] in held or r.get("speaker") == HELD_OUT_SPEAKER for r in rows]
    return [r for r, t in zip(rows, test) if not t], [r for r, t in zip(rows, test) if t]


def make_data(work: Path, shared: Optional[Path], seed: int = 0) -> dict[str, Path]:
    """Generate / convert data, split it, write shards and train a tokenizer; returns their paths."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import absolute_paths, read_manifest, shared_data_manifest, write_manifest, write_shards

    gen = [absolute_paths(r, work / "generated") for r in generate(work / "generated", seed=seed, progress=False)]
    train, tests = split_generated(gen, 0.2, seed)
    tests = {"generated": tests}
    if shared is not None:
        shared_train, tests["shared"] = split_shared(read_manifest(shared_data_manifest(shared, work / "shared.jsonl")))
        train += shared_train
    random.Random(seed).shuffle(train)  # mix sources across shards
    paths = {}
    for name, rows in [("train", train)] + [(f"test_{k}", v) for k, v in tests.items()]:
        manifest = write_manifest(rows, work / f"{name}.jsonl")
        write_shards(manifest, work / "shards" / name, shard_size=100, progress=False)
        paths[name] = work / "shards" / name
    captions = [c for r in train for caps in r["captions"].values()
                for c in ([caps] if isinstance(caps, str) else caps)]
    train_tokenizer(captions, work / "tokenizer", vocab_size=2000)
    paths["tokenizer"] = work / "tokenizer"
    return paths


def summary_table(records: list[dict]) -> str:
    """One line per (dataset, task, language): R@1 and R@10 both ways next to chance."""
    lines = ["| dataset | task | lang | n | t2x R@1 (chance) | t2x R@10 (chance) | x2t R@1 (chance) "
             "| x2t R@10 (chance) |",
             "|:--|:--|:--|--:|--:|--:|--:|--:|"]
    for r in records:
        x = {"image": "i", "video": "v", "audio": "a"}[r["task"].split("-")[0]]
        m = r["metrics"]
        cells = [f"{m[f'{d}_R@{k}']:.1f} ({m[f'chance_{d}_R@{k}']:.1f})"
                 for d in (f"t2{x}", f"{x}2t") for k in (1, 10)]
        cells = [cells[0], cells[1], cells[2], cells[3]]
        lines.append(f"| {r['dataset']} | {r['task']} | {r['language']} | {r['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_demo_suite(work: Path, export: Path) -> None:
    """The demo's last step: the eval suite ``eval/configs/demo.yaml`` (retrieval per language; VQA / captioning
    when their exports exist) -> ``work/eval_demo/results.{json,md,png}``."""
    from mlmm.evaluation.suite import run_suite

    suite = REPO / "eval" / "configs" / "demo.yaml"
    if not suite.is_file():
        return
    paths = run_suite(suite, checkpoint=str(export), out_dir=work / "eval_demo", progress=False,
                      rewrite={"runs/demo": str(work.resolve())})
    print(f"\n[suite] {paths['md']} (+ results.json, results.png)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="work folder (data, shards, run, export, results)")
    p.add_argument("--shared-data", default=str(DEFAULT_SHARED), help="real test data folder, used if present")
    p.add_argument("--no-shared", action="store_true", help="use generated data only")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. train.max_steps=100")
    args = p.parse_args(argv)

    from mlmm.config import load_config
    from mlmm.evaluation import save_results
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.hub import from_pretrained
    from mlmm.training import Trainer

    t0 = time.perf_counter()
    work = Path(args.out)
    shared = Path(args.shared_data)
    shared = None if args.no_shared or not shared.is_dir() else shared
    print(f"[1/4] data: generated{' + real samples from ' + str(shared) if shared else ''} -> {work / 'shards'}")
    paths = make_data(work, shared)
    cfg = load_config(DEMO_CONFIG, [f"data.train_shards={paths['train']}", f"model.text.tokenizer={paths['tokenizer']}",
                                    f"output_dir={work / 'run'}", f"train.ds_config={REPO / 'ds_config.json'}",
                                    *args.overrides])
    print(f"[2/4] train: {cfg.train.max_steps} steps, DeepSpeed ZeRO-{cfg.train.zero_stage} on the "
          f"{'GPU' if __import__('torch').cuda.is_available() else 'CPU'}")
    trainer = Trainer(cfg).setup()
    try:
        trainer.train()
        export = trainer.export()
    finally:
        trainer.cleanup(destroy_process_group=True)
    print(f"[3/4] exported {export}; reloading it for evaluation")
    model = from_pretrained(export)
    records = []
    for name in sorted(k for k in paths if k.startswith("test_")):
        records += evaluate_retrieval(model, str(paths[name]), dataset=name[len("test_"):], progress=False)
    save_results(records, work / "results.json")
    print(f"[4/4] retrieval on held-out items, recall in % (chance in brackets) -> {work / 'results.json'}\n")
    print(summary_table(records))
    run_demo_suite(work, export)
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
