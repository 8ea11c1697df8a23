"""Evaluation suites: retrieval, zero-shot classification, VQA and captioning per language from one YAML (see
``eval/run_suite.py``), for any model :func:`mlmm.evaluation.models.load_model` takes.

    paths = run_suite("eval/configs/demo.yaml", model="runs/demo/run")     # or open_clip:..., transformers:...
    # {"json": .../results.json, "md": .../results.md, "png": .../results.png}
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

log = logging.getLogger(__name__)
TASKS = ("retrieval", "zeroshot", "vqa", "captioning")
FAMILIES = ("retrieval", "zeroshot", "vqa", "captioning")
TASK_KEYS = {"task", "dataset", "shards", "languages", "checkpoint", "model", "decoding", "beam_size", "meteor",
             "batch_size", "classes", "modality", "prompts"}


def headline(record: Mapping[str, Any]) -> tuple[str, Optional[float]]:
    """(metric name, value) shown in the plot for a record."""
    m, task = record.get("metrics", {}), str(record.get("task", ""))
    if task == "vqa":
        return "VQA accuracy", m.get("accuracy")
    if task == "zeroshot_classification":
        return "top-1 accuracy", m.get("acc1")
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
        if t["task"] != "zeroshot" and {"classes", "modality", "prompts"} & set(t):
            raise ValueError(f"{path}: tasks[{i}]: classes / modality / prompts are zeroshot keys")
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


def run_task(model, task: Mapping[str, Any], shards: str, workers: int = 0, base: Optional[Path] = None) -> list[dict]:
    """Run one suite task with an :class:`~mlmm.evaluation.models.EvalModel`; records carry model / pretrained."""
    from mlmm.evaluation.runner import annotate, evaluate_retrieval

    langs = task.get("languages")
    dataset = task.get("dataset") or Path(shards.split(",")[0]).name
    bs = int(task.get("batch_size", 64))
    if task["task"] == "retrieval":
        return evaluate_retrieval(model, shards, languages=langs, dataset=dataset, batch_size=bs, progress=False,
                                  num_workers=workers)
    if task["task"] == "zeroshot":
        from mlmm.evaluation.zeroshot import evaluate_zeroshot

        prompts = [_resolve(p, base) or p for p in task.get("prompts") or []] if base else task.get("prompts") or []
        classes = task.get("classes") or shards
        if base is not None and task.get("classes") and (hit := _resolve(task["classes"], base)):
            classes = hit
        return evaluate_zeroshot(model, shards, classes=classes, modality=task.get("modality"), languages=langs,
                                 prompts=prompts, dataset=dataset, batch_size=bs, num_workers=workers,
                                 progress=False)
    if task["task"] == "vqa":
        from mlmm.evaluation.vqa import evaluate_vqa

        records = evaluate_vqa(model.mlmm, shards, languages=langs, dataset=dataset, batch_size=bs,
                               device=model.device, progress=False)
    else:
        from mlmm.evaluation.captioning import evaluate_captioning

        records = evaluate_captioning(model.mlmm, shards, languages=langs, dataset=dataset,
                                      method=task.get("decoding", "beam"), beam_size=int(task.get("beam_size", 3)),
                                      batch_size=bs, device=model.device, meteor=bool(task.get("meteor", True)),
                                      progress=False)
    return annotate(records, model)


def _can_run(model, task: Mapping[str, Any]) -> Optional[str]:
    from mlmm.evaluation.vqa import find_head

    mods = set(model.modalities)
    if task["task"] == "retrieval" and ("text" not in mods or len(mods) < 2):
        return "retrieval needs a text tower and a media tower"
    if task["task"] == "zeroshot" and "text" not in mods:
        return "zero-shot classification needs a text tower"
    if task["task"] in ("vqa", "captioning") and model.mlmm is None:
        return f"{task['task']} needs an mlmm model with a {'vqa' if task['task'] == 'vqa' else 'caption'} head"
    if task["task"] == "vqa" and find_head(model.mlmm, "VQAHead") is None:
        return "the model has no vqa head"
    if task["task"] == "captioning" and find_head(model.mlmm, "CaptionHead") is None:
        return "the model has no caption head"
    return None


def results_markdown(records: Sequence[Mapping[str, Any]], suite_name: str = "") -> str:
    from mlmm.evaluation.report import markdown_table

    out = [f"# Evaluation suite: {suite_name}", ""] if suite_name else []
    for task in FAMILIES:
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
        if task == "zeroshot":
            out += ["Zero-shot classification as CLIP_benchmark defines it (fractions in [0, 1]): acc1, acc5 (with "
                    "5+ classes), mean_per_class_recall.", ""]
        if task == "vqa":
            out += ["VQAv2 accuracy (official normalisation, min(1, matches/3) over the 10 leave-one-out subsets), "
                    "percent; `acc_majority*` = always the most frequent answer of the evaluated set (per question "
                    "type), a prior baseline.", ""]
    return "\n".join(out).rstrip() + "\n"


def _family(record: Mapping[str, Any]) -> str:
    task = str(record.get("task", ""))
    if task == "vqa":
        return "vqa"
    if task == "zeroshot_classification":
        return "zeroshot"
    if task.endswith("captioning"):
        return "captioning"
    return "retrieval"


def results_plot(records: Sequence[Mapping[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per task family; grouped bars = the headline metric per language, one bar per (task, dataset)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [f for f in FAMILIES if any(_family(r) == f for r in records)]
    fig, axes = plt.subplots(1, max(len(families), 1), figsize=(5.5 * max(len(families), 1), 4), squeeze=False)
    for ax, fam in zip(axes[0], families):
        recs = [r for r in records if _family(r) == fam and headline(r)[1] is not None]
        langs = sorted({r["language"] for r in recs})
        groups = list(dict.fromkeys(f"{r['task']} ({r['dataset']})" for r in recs))
        width = 0.8 / max(len(groups), 1)
        for g, name in enumerate(groups):
            vals = []
            for lang in langs:
                hit = [headline(r)[1] for r in recs
                       if f"{r['task']} ({r['dataset']})" == name and r["language"] == lang]
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


def _model_path(spec: str, base: Path, rewrite: Optional[Mapping[str, str]]) -> Optional[str]:
    """A model spec with a local path resolved like shards; None for a path that does not exist."""
    from mlmm.evaluation.models import PREFIXES, parse_model_spec

    head, _ = parse_model_spec(spec)
    kind, _, rest = head.partition(":")
    if kind in PREFIXES and rest:
        return spec  # open_clip:..., transformers:..., mclip:... resolve themselves
    found = _resolve(_rewrite(head, rewrite), base)
    if found is not None:
        return spec.replace(head, found, 1)
    from mlmm.sources import HubId, parse_source

    return spec if isinstance(parse_source(head), HubId) and "/" in head else None  # an mlmm export on the Hub


def run_suite(config: str | Path, *, model: Optional[str] = None, checkpoint: Optional[str] = None,
              pretrained: Optional[str] = None, out_dir: Optional[str | Path] = None, device: str = "cpu",
              strict: bool = False, progress: bool = True, workers: int = 0,
              rewrite: Optional[Mapping[str, str]] = None) -> dict[str, Path]:
    """Run every task of the suite with ``model`` (any ``--model`` form; ``checkpoint`` is an alias; a task's own
    ``model:`` / ``checkpoint:`` wins). ``rewrite`` = {path prefix: replacement} applied to shards / model paths
    (e.g. the demo maps ``runs/demo`` to its ``--out`` folder). Under ``torchrun`` only rank 0 writes. Returns the
    paths of the three result files. A model that does not load raises :class:`~mlmm.evaluation.models
    .ModelLoadError` (one line); a task whose shards or model folder are missing, or that the model cannot run, is
    skipped and listed (``strict``: an error)."""
    from tqdm.auto import tqdm

    from mlmm.evaluation.distributed import is_main
    from mlmm.evaluation.models import load_model
    from mlmm.evaluation.retrieval import save_results

    suite = load_suite(config)
    default = model or checkpoint
    models: dict[str, Any] = {}
    if default and any(not (t.get("model") or t.get("checkpoint")) for t in suite["tasks"]):
        found = _model_path(str(default), suite["base"], rewrite)  # fail fast: the model first, then the work
        models[found or str(default)] = load_model(found or str(default), device, pretrained=pretrained)
    records: list[dict] = []
    skipped: list[str] = []
    bar = tqdm(suite["tasks"], desc=f"suite {suite['name']}", disable=not progress or not is_main())
    for task in bar:
        bar.set_postfix_str(f"{task['task']}:{task.get('dataset', '')}")
        spec = task.get("model") or task.get("checkpoint") or default
        label = f"{task['task']} / {task.get('dataset', task['shards'])}"
        if not spec:
            raise ValueError(f"{config}: {label}: no model (give --model or tasks[].model)")
        found = _model_path(str(spec), suite["base"], rewrite)
        shards = _resolve(_rewrite(task["shards"], rewrite), suite["base"])
        reason = None if shards else f"shards {task['shards']} not found"
        if reason is None and found is None:
            reason = f"checkpoint {spec} not found"
        if reason is None:
            if found not in models:
                models[found] = load_model(found, device, pretrained=pretrained)
            reason = _can_run(models[found], task)
        if reason:
            if strict:
                raise ValueError(f"{config}: {label}: {reason}")
            log.warning("suite %s: skipping %s: %s", suite["name"], label, reason)
            skipped.append(f"{label}: {reason}")
            continue
        records += run_task(models[found], task, shards, workers, suite["base"])
    local = default and _model_path(str(default), suite["base"], rewrite)
    if out_dir:
        out = Path(out_dir)
    elif local and Path(local.split(",")[0]).exists():
        out = Path(local.split(",")[0]).resolve().parent / f"eval_{suite['name']}"
    else:
        out = Path.cwd() / f"eval_{suite['name']}"
    paths = {"json": out / "results.json", "md": out / "results.md", "png": out / "results.png"}
    if not is_main():
        return paths
    out.mkdir(parents=True, exist_ok=True)
    save_results(records, paths["json"])
    md = results_markdown(records, suite["name"])
    if skipped:
        md += "\nSkipped:\n" + "\n".join(f"- {s}" for s in skipped) + "\n"
    paths["md"].write_text(md, encoding="utf-8")
    results_plot(records, paths["png"], title=f"suite {suite['name']}")
    return paths
