"""Evaluation: retrieval metrics over embeddings, result JSON records and markdown reports."""
from mlmm.evaluation.report import chance_recall, default_metric_keys, markdown_table
from mlmm.evaluation.retrieval import (
    bidirectional_retrieval,
    first_positive_ranks,
    load_results,
    result_record,
    retrieval_metrics,
    save_results,
)

__all__ = [
    "bidirectional_retrieval",
    "chance_recall",
    "default_metric_keys",
    "first_positive_ranks",
    "load_results",
    "markdown_table",
    "result_record",
    "retrieval_metrics",
    "save_results",
]
