"""Official VQAv2 accuracy (min(1, matches / 3) over the 10 leave-one-out subsets) as an ``evaluate`` module."""
import datasets
import evaluate

_DESCRIPTION = """VQA accuracy as the official VQAv2 evaluation computes it: the prediction gets punctuation,
digit-word, article and contraction normalisation, human answers only punctuation processing (when they
disagree); per question min(1, #matching humans / 3) averaged over the 10 leave-one-out subsets of the answers.
Computed by mlmm.evaluation.vqa.vqa_report, the function the mlmm eval suite uses."""

_KWARGS = """
Args:
    predictions: list of str, one answer per question.
    references: list of lists of str, the human answers of each question (10 in VQAv2).
    question_types / answer_types: optional lists of str, one per question (adds per-type accuracies).
Returns:
    {"accuracy": percent, "acc_qtype/<t>": ..., "acc_atype/<t>": ...}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS)
class MlmmVqa(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Sequence(datasets.Value("string"))}))

    def _compute(self, predictions, references, question_types=None, answer_types=None):
        from mlmm.evaluation.vqa import vqa_report

        questions = []
        for i, answers in enumerate(references):
            q = {"answers": list(answers)}
            if question_types is not None:
                q["question_type"] = question_types[i]
            if answer_types is not None:
                q["answer_type"] = answer_types[i]
            questions.append(q)
        return vqa_report(list(predictions), questions)
