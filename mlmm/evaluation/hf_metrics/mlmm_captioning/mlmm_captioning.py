"""Captioning metrics per language (pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr-D; sacreBLEU, chrF) as an
``evaluate`` module."""
import datasets
import evaluate

_DESCRIPTION = """BLEU-1..4, METEOR (with Java), ROUGE-L and CIDEr-D as pycocoevalcap computes them, plus sacreBLEU
and chrF, all x100. The COCO metrics tokenise with PTB for English (with Java), lower-cased words without
punctuation for other space-delimited languages, and characters for zh / ja / th. Computed by
mlmm.evaluation.captioning.caption_metrics, the function the mlmm eval suite uses."""

_KWARGS = """
Args:
    predictions: list of str, one generated caption per item.
    references: list of lists of str, the reference captions of each item.
    language: the captions' language code (default "en"); picks the tokenisation.
    meteor: compute METEOR (needs Java; default True).
Returns:
    {"BLEU-1", ..., "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "sacreBLEU", "chrF", "tokenization"}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MlmmCaptioning(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references, language="en", meteor=True):
        from mlmm.evaluation.captioning import caption_metrics, java_available

        ids = [str(i) for i in range(len(predictions))]
        metrics, info = caption_metrics(dict(zip(ids, predictions)), {i: list(r) for i, r in zip(ids, references)},
                                        language, meteor=bool(meteor) and java_available())
        return {**metrics, "tokenization": info["tokenization"]}
