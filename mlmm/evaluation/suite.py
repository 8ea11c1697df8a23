"""Evaluation suites: retrieval, VQA and captioning per language from one YAML (see ``eval/run_suite.py``).

    paths = run_suite("eval/configs/demo.yaml", checkpoint="runs/demo/run/export")
    # {"json": .../results.json, "md": .../results.md, "png": .../results.png}
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

log = logging.getLogger(__name__)
TASKS = ("retrieval", "vqa", "captioning")
TASK_KEYS = {"task", "dataset", "shards", "languages", "checkpoint", "decoding", "beam_size", "meteor", "batch_size"}


def headline(record: Mapping[str, Any]) -> tuple[str, Optional[float]]:
    """(metric name, value) shown in the plot for a record."""
    m, task = record.get("metrics", {}), str(record.get("task", ""))
    if task == "vqa":
        return "VQA accuracy", m.get("accuracy")
    if task.endswith("captioning"):
        return "CIDEr-D", m.get("CIDEr-D")
    r1 = [v for k, v in m.items() if k.endswith("_R@1") and not k.startswith("chance")]
    return "mean R@1", (sum(r1) / len(r1)) if r1 else None


def load_suite(path: str | Path) -> dict:
    path = Path(path)
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ValueError(f"{path}: tasks: a non-empty list is required")
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or t.get("task") not in TASKS:
            raise ValueError(f"{path}: tasks[{i}].task: must be one of {TASKS}")
        unknown = set(t) - TASK_KEYS
        if unknown:
            raise ValueError(f"{path}: tasks[{i}]: unknown keys {sorted(unknown)}")
        if not t.get("shards"):
            raise ValueError(f"{path}: tasks[{i}].shards: required")
    return {"name": raw.get("name", path.stem), "tasks": tasks, "base": path.resolve().parent}


def _resolve(spec: str, base: Path) -> Optional[str]:
    parts = []
    for part in str(spec).split(","):
        p = Path(part)
        cand = [p] if p.is_absolute() else [base / p, Path.cwd() / p, base.parents[1] / p]
        hit = next((c for c in cand if c.exists() or any(ch in part for ch in "*?[")), None)
        if hit is None:
            return None
        parts.append(str(hit))
    return ",".join(parts)


def _rewrite(path: str, rewrite: Optional[Mapping[str, str]]) -> str:
    for old, new in (rewrite or {}).items():
        if str(path).startswith(old):
            return new + str(path)[len(old):]
    return str(path)


def run_task(model, task: Mapping[str, Any], shards: str, device: str) -> list[dict]:
    from mlmm.evaluation.captioning import evaluate_captioning
    from mlmm.evaluation.runner import evaluate_retrieval
    from mlmm.evaluation.vqa import evaluate_vqa

    langs = task.get("languages")
    dataset = task.get("dataset") or Path(shards.split(",")[0]).name
    bs = int(task.get("batch_size", 64))
    if task["task"] == "retrieval":
        return evaluate_retrieval(model, shards, languages=langs, dataset=dataset, batch_size=bs, device=device,
                                  progress=False)
    if task["task"] == "vqa":
        return evaluate_vqa(model, shards, languages=langs, dataset=dataset, batch_size=bs, device=device,
                            progress=False)
    return evaluate_captioning(model, shards, languages=langs, dataset=dataset, method=task.get("decoding", "beam"),
                               beam_size=int(task.get("beam_size", 3)), batch_size=bs, device=device,
                               meteor=bool(task.get("meteor", True)), progress=False)


def _can_run(model, task: Mapping[str, Any]) -> Optional[str]:
    from mlmm.evaluation.vqa import find_head

    if task["task"] == "retrieval" and ("text" not in model.modalities or len(model.modalities) < 2):
        return "retrieval needs a text tower and a media tower"
    if task["task"] == "vqa" and find_head(model, "VQAHead") is None:
        return "the model has no vqa head"
    if task["task"] == "captioning" and find_head(model, "CaptionHead") is None:
        return "the model has no caption head"
    return None


def results_markdown(records: Sequence[Mapping[str, Any]], suite_name: str = "") -> str:
    from mlmm.evaluation.report import markdown_table

    out = [f"# Evaluation suite: {suite_name}", ""] if suite_name else []
    for task in ("retrieval", "vqa", "captioning"):
        recs = [r for r in records if _family(r) == task]
        if not recs:
            continue
        out += [f"## {task}", "", markdown_table(recs).rstrip(), ""]
        if task == "captioning":
            for r in recs:
                info = r.get("info", {})
                out.append(f"- {r['dataset']} / {r['language']}: COCO metrics tokenised `{info.get('tokenization')}`, "
                           f"sacreBLEU tokenize `{info.get('sacrebleu_tokenize')}`, decoding `{info.get('decoding')}`"
                           + ("" if info.get("meteor", True) else ", METEOR skipped (no java)"))
            out.append("")
        if task == "vqa":
            out += ["VQAv2 accuracy (official normalisation, min(1, matches/3) over the 10 leave-one-out subsets), "
                    "percent; `acc_majority*` = always the most frequent answer of the evaluated set (per question "
                    "type), a prior baseline.", ""]
    return "\n".join(out).rstrip() + "\n"


def _family(record: Mapping[str, Any]) -> str:
    task = str(record.get("task", ""))
    if task == "vqa":
        return "vqa"
    if task.endswith("captioning"):
        return "captioning"
    return "retrieval"


def results_plot(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per task family; grouped bars = the headline metric per language, one bar per (task, dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in ("retrieval", "vqa", "captioning") if any(_family(r) == f for r in records)]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(5.5 * max(len(families), 1), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        recs = [r for r in records if _family(r) == fam and headline(r)[1] is not None]
        langs = sorted({r["language"] for r in recs})
        groups = list(dict.fromkeys(f"{r['task']} ({r['dataset']})" for r in recs))
        width = 0.8 / max(len(groups), 1)
        for g, name in enumerate(groups):
            vals = []
            for lang in langs:
                hit = [headline(r)[1] for r in recs if f"{r['task']} ({r['dataset']})" == name and r["language"] == lang]
                vals.append(hit[0] if hit else 0.0)
            ax.bar([i + g * width - 0.4 + width / 2 for i in range(len(langs))], vals, width, label=name)
        ax.set_xticks(range(len(langs)))
        ax.set_xticklabels(langs)
        ax.set_title(f"{fam}: {headline(recs[0])[0] if recs else ''}")
        ax.set_xlabel("language")
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_suite(config: str | Path, *, checkpoint: Optional[str] = None, out_dir: Optional[str | Path] = None,
              device: str = "cpu", strict: bool = False, progress: bool = True,
              rewrite: Optional[Mapping[str, str]] = None) -> dict[str, Path]:
    """Run every task of the suite; ``rewrite`` = {path prefix: replacement} applied to shards / checkpoints
    (e.g. the demo maps ``runs/demo`` to its ``--out`` folder). Returns the paths of the three result files."""
    from tqdm.auto import tqdm

    from mlmm.evaluation.retrieval import save_results
    from mlmm.hub import from_pretrained

    suite = load_suite(config)
    models: dict[str, Any] = {}
    records: list[dict] = []
    skipped: list[str] = []
    bar = tqdm(suite["tasks"], desc=f"suite {suite['name']}", disable=not progress)
    for task in bar:
        bar.set_postfix_str(f"{task['task']}:{task.get('dataset', '')}")
        ckpt = task.get("checkpoint") or checkpoint
        label = f"{task['task']} / {task.get('dataset', task['shards'])}"
        if not ckpt:
            raise ValueError(f"{config}: {label}: no checkpoint (give --checkpoint or tasks[].checkpoint)")
        found = _resolve(_rewrite(ckpt, rewrite), suite["base"])
        shards = _resolve(_rewrite(task["shards"], rewrite), suite["base"])
        reason = None if shards else f"shards {task['shards']} not found"
        if reason is None and found is None:
            reason = f"checkpoint {ckpt} not found"
        ckpt = found or ckpt
        if reason is None:
            if ckpt not in models:
                models[ckpt] = from_pretrained(ckpt, device=device)
            reason = _can_run(models[ckpt], task)
        if reason:
            if strict:
                raise ValueError(f"{config}: {label}: {reason}")
            log.warning("suite %s: skipping %s: %s", suite["name"], label, reason)
            skipped.append(f"{label}: {reason}")
            continue
        records += run_task(models[ckpt], task, shards, device)
    out = Path(out_dir) if out_dir else Path(checkpoint or ".").resolve().parent / f"eval_{suite['name']}"
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": save_results(records, out / "results.json")}
    md = results_markdown(records, suite["name"])
    if skipped:
        md += "\nSkipped:\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    (out / "results.md").write_text(md, encoding="utf-8")
    paths["md"] = out / "results.md"
    paths["png"] = results_plot(records, out / "results.png", title=f"suite {suite['name']}")
    return paths
