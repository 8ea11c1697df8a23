"""Noisy correspondence for tests and benchmarks: shuffle the captions of a fraction of the samples.

    python -m mlmm.synthetic.noisy --manifest data/synth/manifest.jsonl --out data/noisy --fraction 0.3 --seed 0

A seeded ``fraction`` of the captioned rows exchange their captions (a permutation among themselves,
repaired so that no row keeps captions of its own ``class`` when rows carry one, i.e. every shuffled
pair really is mismatched). Each output row gets ``"noisy": true|false`` and, when shuffled,
``"caption_source": <key whose captions it now has>``. The flag is for *evaluating* the clean/noisy
split only; no loss reads it. Writes ``out/manifest.jsonl`` (media paths made absolute) and shards in
``out/shards``.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any, Optional

def shuffle_captions(rows: list[dict[str, Any]], fraction: float, seed: int = 0) -> list[dict[str, Any]]:
    """Copies of ``rows`` with the captions of ``round(fraction * #captioned)`` rows permuted among them."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    out = [{**r, "noisy": False} for r in rows]
    captioned = [i for i, r in enumerate(rows) if r.get("captions")]
    chosen = sorted(rng.sample(captioned, round(fraction * len(captioned))))
    if len(chosen) < 2:
        return out
    source = chosen[:]
    rng.shuffle(source)

    def label(i: int) -> Any:
        return rows[i].get("class", rows[i]["key"])

    # repair: a row that got captions of its own class (or its own) swaps its source with another row
    for _ in range(20):
        bad = [p for p, i in enumerate(chosen) if label(source[p]) == label(i)]
        if not bad:
            break
        for p in bad:
            q = rng.randrange(len(chosen))
            if label(source[q]) != label(chosen[p]) and label(source[p]) != label(chosen[q]):
                source[p], source[q] = source[q], source[p]
    for i, j in zip(chosen, source):
        mismatched = label(i) != label(j)
        out[i] = {**out[i], "captions": rows[j]["captions"], "noisy": mismatched,
                  **({"caption_source": rows[j]["key"]} if mismatched else {})}
    return out


def make_noisy_shards(manifest: str | Path, out_dir: str | Path, fraction: float = 0.3, seed: int = 0,
                      shard_size: int = 1000, progress: bool = False) -> dict[str, Any]:
    """Read a manifest, shuffle captions (:func:`shuffle_captions`), write ``out/manifest.jsonl`` + ``out/shards``.

    Returns the shard index plus ``"noisy_keys"`` (sorted keys whose pair is mismatched).
    """
    from mlmm.data.write_shards import absolute_paths, read_manifest, write_shards

    manifest = Path(manifest)
    base = manifest.parent
    rows = [absolute_paths(r, base) for r in read_manifest(manifest)]  # the new manifest lives elsewhere
    noisy = shuffle_captions(rows, fraction, seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.jsonl", "w", encoding="utf-8") as f:
        for r in noisy:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    index = write_shards(out / "manifest.jsonl", out / "shards", shard_size=shard_size, progress=progress)
    index["noisy_keys"] = sorted(r["key"] for r in noisy if r["noisy"])
    return index


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Shuffle the captions of a fraction of a manifest's rows.")
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=1000)
    args = parser.parse_args(argv)
    index = make_noisy_shards(args.manifest, args.out, args.fraction, args.seed, args.shard_size, progress=True)
    print(f"{index['n_samples']} samples, {len(index['noisy_keys'])} mismatched -> {Path(args.out) / 'shards'}")


if __name__ == "__main__":
    main()
