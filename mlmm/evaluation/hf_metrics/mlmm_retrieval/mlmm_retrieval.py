"""Retrieval recall@k, median and mean rank (mlmm / CLIP_benchmark convention) as an ``evaluate`` module."""
import datasets
import evaluate
import torch

_DESCRIPTION = """Recall@k (percent), MdR and MnR of ranked retrieval. Each prediction is one query's scores over the
whole gallery (higher = more similar, e.g. text_emb @ image_emb.T); each reference is the list of its positive
gallery indices. A query hits at k if ANY positive is in its top-k; its rank is 1 + the number of gallery items
scoring strictly higher than its best positive (ties never push a positive down). Computed by
mlmm.evaluation.retrieval.retrieval_metrics, the function the mlmm eval suite uses."""

_KWARGS = """
Args:
    predictions: list of lists of float, [Q][G]: each query's score for every gallery item.
    references: list of lists of int: each query's positive gallery indices (at least one).
    ks: recall cut-offs (default (1, 5, 10)).
Returns:
    {"R@k": percent for each k, "MdR": median rank, "MnR": mean rank}
Example:
    >>> m = evaluate.load(mlmm.evaluation.hf_metrics.metric_path("mlmm_retrieval"))
    >>> m.compute(predictions=[[0.9, 0.1], [0.2, 0.3]], references=[[0], [0]], ks=[1])
    {'R@1': 50.0, 'MdR': 1.5, 'MnR': 1.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MlmmRetrieval(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float64")),
                                        "references": datasets.Sequence(datasets.Value("int64"))}))

    def _compute(self, predictions, references, ks=(1, 5, 10)):
        from mlmm.evaluation.retrieval import retrieval_metrics

        scores = torch.tensor(predictions, dtype=torch.float64)  # [Q, G]
        # scores @ I == scores exactly: the suite's metric on precomputed scores
        return retrieval_metrics(scores, torch.eye(scores.shape[1], dtype=torch.float64),
                                 [list(r) for r in references], ks=tuple(ks))
