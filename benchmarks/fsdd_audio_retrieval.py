"""Spoken-digit (FSDD) audio <-> text retrieval per language with a tiny model trained from scratch.

    python -m benchmarks.fsdd_audio_retrieval [--steps 600] [--held-out-speaker theo] [--shared ../shared/data]

Data: ``../shared/data/audio_fsdd`` (300 recordings: 6 speakers x 10 digits x 5, captions en/de/fr/es
"the spoken digit seven", ...). **Split: every recording of one speaker (default ``theo``, 50 clips,
5 per digit) is held out**; the model never hears that voice in training. The tiny audio ViT + text
encoder (recipes/configs/tiny_clip.yaml sizes, 1 s of audio) is trained with InfoNCE (audio, text)
on clips decoded once (benchmarks/cached_training.py: same model, loss and schedule as the Trainer,
without re-decoding every epoch), exported, reloaded and evaluated with
:func:`mlmm.evaluation.runner.evaluate_retrieval`: identical captions are merged, so a2t is 10-way
(chance R@1 = 10 %) and each t2a query has 5 positives among 50 clips (chance R@1 = 10 %).
Writes ``benchmarks/results/fsdd_audio_retrieval.json`` and prints a table.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def build_data(shared: Path, work: Path, held_out: str) -> dict[str, Path]:
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import read_manifest, shared_data_manifest, write_shards

    rows = [r for r in read_manifest(shared_data_manifest(shared, work / "shared.jsonl"))
            if r.get("source") == "audio_fsdd"]
    if not rows:
        raise FileNotFoundError(f"{shared}/audio_fsdd: no FSDD recordings found")
    train = [r for r in rows if r.get("speaker") != held_out]
    test = [r for r in rows if r.get("speaker") == held_out]
    if not test:
        raise ValueError(f"speaker {held_out!r} not in FSDD (speakers: {sorted({r.get('speaker') for r in rows})})")
    random.Random(0).shuffle(train)
    out = {}
    for name, part in (("train", train), ("test", test)):
        manifest = work / f"{name}.jsonl"
        manifest.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part), encoding="utf-8")
        write_shards(manifest, work / "shards" / name, shard_size=60, progress=False)
        out[name] = work / "shards" / name
    caps = [c for r in train for cs in r["captions"].values() for c in ([cs] if isinstance(cs, str) else cs)]
    train_tokenizer(caps, work / "tok", vocab_size=200)
    out["tok"] = work / "tok"
    out["n_train"], out["n_test"] = len(train), len(test)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--work", default=str(REPO / "runs" / "bench_fsdd"))
    p.add_argument("--held-out-speaker", default="theo")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "fsdd_audio_retrieval.json"))
    args = p.parse_args(argv)

    from mlmm.config import load_config
    from mlmm.evaluation import markdown_table
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.hub import from_pretrained
    from benchmarks.cached_training import export, train_cached

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    data = build_data(Path(args.shared), work, args.held_out_speaker)
    raw = yaml.safe_load((REPO / "recipes" / "configs" / "tiny_clip.yaml").read_text())
    raw["model"].pop("image"), raw["model"].pop("video")
    raw["model"]["audio"].update(seconds=1.0)
    raw["loss"] = {"name": "contrastive", "pairs": [["audio", "text"]]}
    raw["data"].update(batch_size=args.batch_size, shuffle_buffer=128)
    raw["train"].update(max_steps=args.steps, warmup_steps=30, log_every=100, lr=2.0e-3, save_every=0)
    raw["seed"] = args.seed
    cfg_path = work / "fsdd.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    run = work / f"run_seed{args.seed}"
    cfg = load_config(cfg_path, [f"data.train_shards={data['train']}", f"model.text.tokenizer={data['tok']}",
                                 f"output_dir={run}", f"train.ds_config={REPO / 'ds_config.json'}",
                                 "train.resume=never", "train.progress=false"])
    t0 = time.time()
    model, history = train_cached(cfg, log_every=100)
    exported = export(model, cfg, run / "export")
    train_s = time.time() - t0
    model = from_pretrained(exported)
    records = evaluate_retrieval(model, str(data["test"]), dataset=f"fsdd (held-out speaker {args.held_out_speaker})",
                                 progress=False)
    summary = {r["language"]: {"a2t_R@1": r["metrics"]["a2t_R@1"], "t2a_R@1": r["metrics"]["t2a_R@1"],
                               "chance_a2t_R@1": r["metrics"]["chance_a2t_R@1"],
                               "chance_t2a_R@1": r["metrics"]["chance_t2a_R@1"]} for r in records}
    result = {"benchmark": "fsdd_audio_retrieval", "held_out_speaker": args.held_out_speaker,
              "n_train": data["n_train"], "n_test": data["n_test"], "steps": args.steps,
              "batch_size": args.batch_size, "seed": args.seed, "train_seconds": round(train_s, 1), "history": history,
              "summary": summary, "results": records}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    print(markdown_table(records))
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out} (training {train_s:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
