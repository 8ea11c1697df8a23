"""Zero-shot classification per language, for image, video and audio, as CLIP_benchmark defines it.

    records = evaluate_zeroshot(model, "shards/fsdd_test", classes="fsdd", languages=["en", "de", "fr", "es"])

For each language, each class gets the mean of its L2-normalised prompt embeddings (every template with ``{c}``
replaced by the class name in that language), re-normalised; logits are media embeddings @ those class vectors.
Metrics (CLIP_benchmark's ``zeroshot_classification``, as fractions in [0, 1]): ``acc1``, ``acc5`` (only with at
least 5 classes: CLIP_benchmark writes NaN there, we leave the key out) and ``mean_per_class_recall`` (recall of
each class that has test samples, averaged: scikit-learn's ``balanced_accuracy_score``). The media are streamed and
embedded once (:mod:`mlmm.evaluation.stream`), then scored in every language.
"""
from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from mlmm.evaluation.distributed import split_encode
from mlmm.evaluation.models.mlmm_model import as_eval_model
from mlmm.evaluation.prompts import ClassSet, class_set, load_prompts
from mlmm.evaluation.retrieval import result_record

TASK = "zeroshot_classification"


def zeroshot_classifier(encode_text, names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[C, E] class vectors: per class, the normalised mean of its normalised prompt embeddings.

    ``encode_text(list[str]) -> [N, E]`` (any scale: each prompt embedding is normalised here)."""
    prompts = [t.replace("{c}", name) for name in names for t in templates]
    z = F.normalize(encode_text(prompts).float(), dim=-1).view(len(names), len(templates), -1)  # [C, T, E]
    return F.normalize(z.mean(dim=1), dim=-1)  # [C, E]


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """``acc1``, ``acc5`` (C >= 5) and ``mean_per_class_recall`` of logits [N, C] against classes Long[N]."""
    n, c = logits.shape
    if n == 0:
        raise ValueError("classification_metrics: no samples")
    top = logits.topk(min(5, c), dim=1).indices  # [N, k]; ties by kernel order, as CLIP_benchmark's topk
    hit = top == target[:, None]  # [N, k]
    out = {"acc1": float(hit[:, 0].float().mean())}
    if c >= 5:
        out["acc5"] = float(hit[:, :5].any(dim=1).float().mean())
    pred = logits.argmax(dim=1)  # as CLIP_benchmark's mean_per_class_recall
    recalls = [float((pred[target == k] == k).float().mean()) for k in torch.unique(target).tolist()]
    out["mean_per_class_recall"] = sum(recalls) / len(recalls)
    return out


def evaluate_zeroshot(model, shards, *, classes: str | ClassSet, modality: Optional[str] = None,
                      languages: Optional[Sequence[str]] = None, prompts: Sequence[str] = (), dataset: str = "",
                      batch_size: int = 64, num_workers: int = 0, device=None, progress: bool = True) -> list[dict]:
    """One ``zeroshot_classification`` record per language (see module doc).

    ``classes``: a dataset name of the prompts YAML, a classes YAML, or a shard folder with ``classes.yaml``
    (default: ``shards`` itself). ``languages`` default to every language with class names and templates; a
    requested language without either is an error naming the missing entry. Samples without a usable label are
    left out and counted in ``skipped`` ("no label").
    """
    from mlmm.evaluation.runner import annotate
    from mlmm.evaluation.stream import embed_test_set, fields_of

    model = as_eval_model(model, device)
    table = load_prompts(prompts)
    cs = classes if isinstance(classes, ClassSet) else class_set(classes, table)
    modality = modality or cs.modality or "image"
    if modality not in model.modalities or "text" not in model.modalities:
        raise ValueError(f"zero-shot {cs.name}: needs {modality} and text encoders; {model.name} has "
                         f"{', '.join(model.modalities)}")
    langs = _languages(cs, modality, languages, table)
    data = embed_test_set(model, shards, [modality], keep=fields_of(cs.label_key), batch_size=batch_size,
                          num_workers=num_workers, progress=progress, desc=f"zero-shot {cs.name}")
    skipped = Counter(data.skipped)
    labels = [cs.label(data.meta[int(i)]) for i in data.rows.get(modality, torch.empty(0, dtype=torch.long))]
    keep = torch.tensor([y is not None for y in labels], dtype=torch.bool)
    if not bool(keep.all()):
        skipped["no label"] += int((~keep).sum())
    if not bool(keep.any()):
        raise ValueError(f"zero-shot {cs.name}: no {modality} sample of {shards} has a class in "
                         f"json[{cs.label_key!r}] (skipped: {dict(skipped)})")
    x = data.emb[modality][keep]  # [N, E]
    target = torch.tensor([y for y in labels if y is not None], dtype=torch.long)  # [N]
    records = []
    for lang in langs:
        templates = cs.templates_for(modality, lang, table)
        weights = zeroshot_classifier(lambda t: split_encode(lambda p: model.encode_text(p, batch_size), t,
                                                             batch_size, order=model.text_order(t)),
                                      cs.names[lang], templates)  # [C, E]
        metrics = classification_metrics(100.0 * x @ weights.T, target)  # logits [N, C]
        metrics["n_classes"] = float(len(cs))
        rec = result_record(TASK, dataset or cs.name, lang, metrics, n=len(target))
        rec.update(modality=modality, n_templates=len(templates))
        records.append(rec)
    return annotate(records, model, dict(skipped))


def _languages(cs: ClassSet, modality: str, languages: Optional[Sequence[str]], table: dict) -> list[str]:
    if languages:
        for lang in languages:
            if lang not in cs.names:
                raise ValueError(f"zero-shot {cs.name}: no class names for {lang!r} (has {', '.join(cs.names)}); "
                                 f"add classes.{lang} to your prompts YAML")
            if not cs.templates_for(modality, lang, table):
                raise ValueError(f"zero-shot {cs.name}: no {modality} templates for {lang!r}; add "
                                 f"templates.{modality}.{lang} to your prompts YAML")
        return list(languages)
    langs = [lang for lang in sorted(cs.names) if cs.templates_for(modality, lang, table)]
    if not langs:
        raise ValueError(f"zero-shot {cs.name}: no language has both class names and {modality} templates")
    return langs
