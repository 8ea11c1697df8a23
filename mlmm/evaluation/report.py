"""Markdown tables across languages for eval records, and chance-level recall.

    print(markdown_table(load_results("results.json")))

Records are the dicts of :func:`mlmm.evaluation.retrieval.result_record`:
``{"task", "dataset", "language", "n", "metrics": {...}}``.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional, Sequence

_DIRECTIONAL = re.compile(r"^([a-z]+)2([a-z]+)_R@(\d+)$")  # "t2i_R@5" -> ("t", "i", "5")
_PLAIN_RECALL = re.compile(r"^R@(\d+)$")
_RANK_SUFFIXES = ("MdR", "MnR")
MISSING = "–"


def default_metric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Columns shown by default, from the metric keys present in ``records``.

    Bidirectional results: ``t2x_R@k`` for every k (ascending), then ``x2t_R@k``, then ``rsum``.
    Single-direction results: ``R@k`` ascending, then ``MdR``, ``MnR``. Otherwise every key seen.
    """
    keys: list[str] = []
    for record in records:
        keys += [k for k in record.get("metrics", {}) if k not in keys]

    directional = [(m.group(1), m.group(2), int(m.group(3))) for k in keys if (m := _DIRECTIONAL.match(k))]
    if directional:
        directions = list(dict.fromkeys(f"{a}2{b}" for a, b, _ in directional))
        directions.sort(key=lambda d: not d.startswith("t2"))  # text->x first, stable otherwise
        cols = [
            f"{d}_R@{k}"
            for d in directions
            for k in sorted({k for a, b, k in directional if f"{a}2{b}" == d})
        ]
        return cols + (["rsum"] if "rsum" in keys else [])

    plain = sorted((int(m.group(1)) for k in keys if (m := _PLAIN_RECALL.match(k))))
    if plain:
        return [f"R@{k}" for k in plain] + [k for k in _RANK_SUFFIXES if k in keys]
    return keys


FRACTIONS = ("acc1", "acc5", "mean_per_class_recall")  # zero-shot metrics in [0, 1], as CLIP_benchmark writes them


def _format(key: str, value: Any) -> str:
    if value is None:
        return MISSING
    if key in FRACTIONS:
        return f"{float(value):.4f}"
    if key.endswith(_RANK_SUFFIXES):
        return f"{float(value):.1f}"
    return f"{float(value):.2f}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(records: Sequence[Mapping[str, Any]], metrics: Optional[list[str]] = None) -> str:
    """One markdown table per (task, dataset), one row per record (language), in input order.

    Args:
        records: eval records (see module doc).
        metrics: metric keys to show as columns; default :func:`default_metric_keys` per table.

    Returns:
        Tables separated by blank lines, each headed ``### <task> (<dataset>)``; columns are
        ``language``, the metrics (2 decimals, ranks MdR/MnR 1 decimal, "–" when missing) and ``n``.
    """
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for record in records:
        groups.setdefault((str(record["task"]), str(record["dataset"])), []).append(record)

    tables = []
    for (task, dataset), rows in groups.items():
        cols = list(metrics) if metrics is not None else default_metric_keys(rows)
        lines = [
            f"### {task} ({dataset})",
            "",
            "| " + " | ".join(["language", *map(_cell, cols), "n"]) + " |",
            "|" + "|".join([":---", *["---:"] * len(cols), "---:"]) + "|",
        ]
        for row in rows:
            values = [_format(c, row.get("metrics", {}).get(c)) for c in cols]
            lines.append("| " + " | ".join([_cell(row["language"]), *values, str(row.get("n", MISSING))]) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables) + ("\n" if tables else "")


def chance_recall(n_gallery: int, n_positives: int = 1, k: int = 1) -> float:
    """Recall@k (percent) of a uniformly random ranking: P(at least one of p positives in the top-k).

    Hypergeometric: ``1 - C(G - p, k) / C(G, k) = 1 - prod_{i<k} (G - p - i) / (G - i)``.
    E.g. ``chance_recall(10) == 10.0``, ``chance_recall(1000, 5, 10) ~= 4.9``.
    """
    if n_gallery < 1 or not 1 <= n_positives <= n_gallery or k < 1:
        raise ValueError(f"need G >= 1, 1 <= p <= G, k >= 1; got G={n_gallery}, p={n_positives}, k={k}")
    miss = 1.0  # P(no positive in the top-k)
    for i in range(min(k, n_gallery)):
        if n_gallery - n_positives - i <= 0:
            return 100.0
        miss *= (n_gallery - n_positives - i) / (n_gallery - i)
    return 100.0 * (1.0 - miss)
