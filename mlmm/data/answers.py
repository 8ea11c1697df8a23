"""The VQA answer vocabulary: a data step run once on the training shards, before training.

    mlmm-vqa-answers --shards data/vqa/shards_train --out data/vqa/answers.json --min-count 1 --max-answers 3129

It counts every human answer (every language; normalised as the official VQA script does, :func:`normalize_answer`)
and keeps the most frequent ones (ties: alphabetical), the VQAv2 convention. The ``vqa`` head names the file
(``model.heads.vqa.answers_from: data/vqa/answers.json``); the config reads it when it loads and keeps the list in
``answers``, so an export's ``config.json`` carries the vocabulary and no rank scans shards to build a model.

File: ``{"answers": [...], "counts": {answer: n}, "shards": spec, "min_count": n, "max_answers": n}``.
"""
from __future__ import annotations

import argparse
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterable, Optional, Sequence

from tqdm import tqdm

from mlmm.atomic import write_atomic

log = logging.getLogger(__name__)


def build_answer_vocab(answer_lists: Iterable[Sequence[str]], min_count: int = 1,
                       max_answers: Optional[int] = None) -> tuple[list[str], Counter]:
    """(normalised answers with at least ``min_count`` occurrences, most frequent first, ties alphabetical, at most
    ``max_answers``; the counts of every normalised answer)."""
    from mlmm.evaluation.vqa import normalize_answer

    counts = Counter(normalize_answer(a) for answers in answer_lists for a in answers)
    vocab = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return (vocab[:max_answers] if max_answers else vocab), counts


def shard_answers(shards: str, progress: bool = True) -> Iterable[list[str]]:
    """Every answer list (every language) of every sample in ``shards``."""
    from mlmm.data.shards import iter_samples, resolve_shards

    for raw in tqdm(iter_samples(resolve_shards(shards)), desc="answers", disable=not progress):
        for answers in ((raw.get("json") or {}).get("answers") or {}).values():
            yield list(answers)


def write_answer_vocab(shards: str, out: str | Path, *, min_count: int = 1, max_answers: Optional[int] = 3129,
                       progress: bool = True) -> list[str]:
    """Count the answers of ``shards`` and write the vocabulary file ``out`` (atomically); returns the vocabulary.
    ValueError when the shards hold no answer."""
    vocab, counts = build_answer_vocab(shard_answers(shards, progress), min_count, max_answers)
    if not vocab:
        raise ValueError(f"{shards}: no sample carries answers (json 'answers': {{lang: [str, ...]}})")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"answers": vocab, "counts": {a: counts[a] for a in vocab}, "shards": str(shards),
              "min_count": min_count, "max_answers": max_answers}
    write_atomic(out, json.dumps(record, ensure_ascii=False, indent=1))
    log.info("%d answers (of %d distinct) -> %s", len(vocab), len(counts), out)
    return vocab


def read_answer_vocab(path: str | Path) -> list[str]:
    """The ``answers`` list of a vocabulary file; ValueError naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} is not an answer vocabulary file (build one from the training shards: "
                         f"mlmm-vqa-answers --shards SHARDS --out {path.name if path.suffix else 'answers.json'})")
    try:
        answers = json.loads(path.read_text(encoding="utf-8"))["answers"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not an answer vocabulary file written by mlmm-vqa-answers ({e})") from None
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: 'answers' must be a non-empty list of strings")
    return answers


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="mlmm-vqa-answers", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="training shards (folder, glob, brace range, URL, ...)")
    p.add_argument("--out", required=True, help="the vocabulary file to write (JSON)")
    p.add_argument("--min-count", type=int, default=1, help="keep answers given at least this often")
    p.add_argument("--max-answers", type=int, default=3129, help="keep at most this many (VQAv2: 3129)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.min_count < 1 or args.max_answers < 1:
        p.error("--min-count and --max-answers must be >= 1")
    write_answer_vocab(args.shards, args.out, min_count=args.min_count, max_answers=args.max_answers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
