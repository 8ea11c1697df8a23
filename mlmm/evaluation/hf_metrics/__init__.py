"""mlmm's retrieval, VQA and captioning metrics as Hugging Face ``evaluate`` modules, loadable offline.

    import evaluate
    from mlmm.evaluation.hf_metrics import metric_path
    recall = evaluate.load(metric_path("mlmm_retrieval"))     # a local module path: nothing is fetched
    recall.compute(predictions=scores, references=positives)  # scores: per query, one score per gallery item

Modules: ``mlmm_retrieval`` (R@k / MdR / MnR of :func:`mlmm.evaluation.retrieval.retrieval_metrics`),
``mlmm_vqa`` (official VQAv2 accuracy, :func:`mlmm.evaluation.vqa.vqa_report`), ``mlmm_captioning`` (BLEU-1..4,
METEOR, ROUGE-L, CIDEr-D, sacreBLEU, chrF per language, :func:`mlmm.evaluation.captioning.caption_metrics`).
Each module calls those functions: the figures are the same as the eval suite's.
"""
from __future__ import annotations

from pathlib import Path

MODULES = ("mlmm_retrieval", "mlmm_vqa", "mlmm_captioning")


def metric_path(name: str) -> str:
    """The folder ``evaluate.load`` takes for module ``name`` (one of :data:`MODULES`)."""
    if name not in MODULES:
        raise ValueError(f"unknown metric module {name!r}; mlmm has {', '.join(MODULES)}")
    return str(Path(__file__).resolve().parent / name)
