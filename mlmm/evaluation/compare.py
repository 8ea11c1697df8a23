"""Compare models: merge results files (mlmm's results.json, CLIP_benchmark's per-run JSON) into one markdown
table and one plot, models x languages.

    rows = load_rows(["a/results.json", "b/results.json", "clip_benchmark_out/"])
    md = compare_table(rows)            # | dataset | task | metric | model | en | de | ... |  (best per column bold)
    compare_plot(rows, "compare.png")   # one panel per (dataset, task): bars per language, one per model

Each row is one (model, dataset, task, language) with the metric shown: the task's headline (mean R@1 for
retrieval, acc1 for zero-shot classification, VQA accuracy, CIDEr-D) or ``metric=``. CLIP_benchmark's
``zeroshot_retrieval`` rows are mapped to mlmm's ``image-text`` keys (``image_retrieval_recall@k`` -> ``t2i_R@k``,
``text_retrieval_recall@k`` -> ``i2t_R@k``, fractions -> percent) so both tools' retrieval rows compare directly.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

_CB_RECALL = re.compile(r"^(image|text)_retrieval_recall@(\d+)$")


def _from_clip_benchmark(raw: dict) -> dict:
    """A CLIP_benchmark dump ``{dataset, model, pretrained, task, metrics, language}`` as an mlmm record."""
    rec = {k: raw.get(k, "") for k in ("dataset", "model", "pretrained", "task", "language")}
    metrics = dict(raw.get("metrics") or {})
    if rec["task"] == "zeroshot_retrieval":
        rec["task"] = "image-text"
        mapped = {}
        for k, v in metrics.items():
            m = _CB_RECALL.match(k)
            if m and v is not None:
                mapped[f"{'t2i' if m.group(1) == 'image' else 'i2t'}_R@{m.group(2)}"] = 100.0 * float(v)
        metrics = mapped
    rec["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and v == v}  # drop NaN
    return rec


def load_rows(paths: Sequence[str | Path], labels: Optional[dict[str, str]] = None) -> list[dict]:
    """Records from results files or folders of them (``*.json``); ``labels`` {path: model name} names the model
    of records that carry none (older mlmm results)."""
    records: list[dict] = []
    for p in paths:
        p = Path(p)
        files = sorted(p.glob("*.json")) if p.is_dir() else [p]
        if not files:
            raise FileNotFoundError(f"{p}: no results JSON here")
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{f}: results file not found")
            raw = json.loads(f.read_text(encoding="utf-8"))
            found = raw["results"] if isinstance(raw, dict) and "results" in raw else raw if isinstance(raw, list) \
                else [_from_clip_benchmark(raw)] if isinstance(raw, dict) and "metrics" in raw else None
            if found is None:
                raise ValueError(f"{f}: neither mlmm results ({{'results': [...]}}) nor a CLIP_benchmark result")
            default = (labels or {}).get(str(p)) or (labels or {}).get(str(f)) or f.parent.name
            for r in found:
                records.append({**r, "model": r.get("model") or default, "pretrained": r.get("pretrained") or ""})
    return records


def model_label(record: dict) -> str:
    pre = str(record.get("pretrained") or "")
    return f"{record['model']} ({pre})" if pre and pre not in str(record["model"]) else str(record["model"])


def pick(record: dict, metric: Optional[str] = None) -> tuple[str, Optional[float]]:
    from mlmm.evaluation.suite import headline

    if metric:
        return metric, record.get("metrics", {}).get(metric)
    return headline(record)


def _grid(rows: Iterable[dict], metric: Optional[str]):
    """{(dataset, task): (metric name, {model: {language: value}})} and the sorted languages."""
    groups: dict[tuple[str, str], tuple[str, dict[str, dict[str, float]]]] = {}
    langs: set[str] = set()
    for r in rows:
        name, value = pick(r, metric)
        if value is None:
            continue
        key = (str(r["dataset"]), str(r["task"]))
        groups.setdefault(key, (name, {}))[1].setdefault(model_label(r), {})[str(r["language"])] = float(value)
        langs.add(str(r["language"]))
    return dict(sorted(groups.items())), sorted(langs)


def compare_table(rows: Sequence[dict], metric: Optional[str] = None) -> str:
    """One markdown table: a row per (dataset, task, model), a column per language; the best value of each
    (dataset, task, language) in bold."""
    from mlmm.evaluation.report import MISSING, _format

    groups, langs = _grid(rows, metric)
    lines = ["| dataset | task | metric | model | " + " | ".join(langs) + " |",
             "|:--|:--|:--|:--|" + "--:|" * len(langs)]
    for (dataset, task), (name, models) in groups.items():
        best = {lang: max((v[lang] for v in models.values() if lang in v), default=None) for lang in langs}
        key = metric or {"zeroshot_classification": "acc1"}.get(task, "")
        for model, values in sorted(models.items()):
            cells = []
            for lang in langs:
                v = values.get(lang)
                text = MISSING if v is None else _format(key, v)
                cells.append(f"**{text}**" if v is not None and len(models) > 1 and v == best[lang] else text)
            lines.append(f"| {dataset} | {task} | {name} | {model} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_plot(rows: Sequence[dict], path: str | Path, metric: Optional[str] = None, title: str = "") -> Path:
    """One figure, one panel per (dataset, task): grouped bars, languages on x, one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups, _ = _grid(rows, metric)
    n = max(len(groups), 1)
    cols = min(n, 3)
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5.5 * cols, 4 * ((n + cols - 1) // cols)),
                             squeeze=False)
    for ax, ((dataset, task), (name, models)) in zip(axes.flat, groups.items()):
        langs = sorted({lang for v in models.values() for lang in v})
        width = 0.8 / max(len(models), 1)
        for i, (model, values) in enumerate(sorted(models.items())):
            ax.bar([j + i * width - 0.4 + width / 2 for j in range(len(langs))],
                   [values.get(lang, 0.0) for lang in langs], width, label=model)
        ax.set_xticks(range(len(langs)))
        ax.set_xticklabels(langs)
        ax.set_title(f"{dataset} / {task}", fontsize=9)
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def compare(paths: Sequence[str | Path], out: str | Path, *, metric: Optional[str] = None,
            labels: Optional[dict[str, str]] = None) -> dict[str, Any]:
    """``out.md`` + ``out.png`` from ``paths``; returns {"md", "png", "rows"}."""
    rows = load_rows(paths, labels)
    if not rows:
        raise ValueError(f"no results in {', '.join(map(str, paths))}")
    out = Path(out)
    md = out.with_suffix(".md")
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text(compare_table(rows, metric), encoding="utf-8")
    return {"md": md, "png": compare_plot(rows, out.with_suffix(".png"), metric), "rows": rows}
