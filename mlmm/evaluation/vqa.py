"""VQAv2 accuracy, exactly as the official evaluation script (GT-Vision-Lab/VQA ``vqaEval.py``).

    acc = vqa_accuracy("Two", ["2"] * 7 + ["3"] * 3)      # 1.0
    report = vqa_report(predictions, questions)            # overall / per question type / per answer type

Per question (official semantics, reproduced on purpose, quirks included):

1. the prediction: ``\\n``/``\\t`` -> space, strip, :func:`process_punctuation`, :func:`process_digit_article`
   (lower-case, number words ``zero..ten``/``none`` -> digits, drop articles ``a an the``, restore contractions);
2. the 10 human answers: only when they are not all identical, :func:`process_punctuation` (NOT digits/articles:
   the official script assumes the stored answers are already normalised, as the VQAv2 annotations are —
   use :func:`normalize_answer` when building a data set);
3. ``acc = mean over the 10 leave-one-out subsets of 9 answers of min(1, #matches in the subset / 3)``
   (the official code drops one answer *record* per subset; identical strings are still distinct records).

The official period regex ``(?!<=\\d)(\\.)(?!\\d)`` and its ``re.sub(..., re.UNICODE)`` call (which passes 32 as
``count``) are kept verbatim. Accuracies are reported in percent (the official script rounds to 2 decimals;
we keep full precision). Number words / articles are English-only in the official script; other languages get
the same (language-neutral) punctuation handling and exact matching.
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Any, Mapping, Optional, Sequence

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
              "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: official pattern (a lookahead, not a lookbehind)
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: a punctuation mark next to a space (or any text with a digit,digit
    comma) is deleted, otherwise replaced by a space; then periods not followed by a digit are removed."""
    out = text
    for p in PUNCT:
        if (p + " " in text or " " + p in text) or re.search(COMMA_STRIP, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE (=32) lands in `count`, as in the official code


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, number words -> digits, drop articles, fix contractions."""
    words = [MANUAL_MAP.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The full normalisation applied to predictions (and used to build answer vocabularies / store answers)."""
    return process_digit_article(process_punctuation(_clean(text)))


def vqa_accuracy(prediction: str, gt_answers: Sequence[str]) -> float:
    """Official per-question VQA accuracy in [0, 1] of ``prediction`` against the human answers."""
    if not gt_answers:
        raise ValueError("vqa_accuracy: no ground-truth answers")
    res = normalize_answer(prediction)
    gts = [_clean(a) for a in gt_answers]
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    accs = []
    for i in range(len(gts)):  # leave answer record i out
        matches = sum(1 for j, a in enumerate(gts) if j != i and a == res)
        accs.append(min(1.0, matches / 3.0))
    return sum(accs) / len(accs)


def soft_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """VQA accuracy every distinct (normalised) answer would get: the soft target for BCE training.

    With ``c`` of ``n`` answers equal to ``a``: ``(c * min(1, (c-1)/3) + (n-c) * min(1, c/3)) / n``.
    """
    counts = Counter(normalize_answer(a) for a in gt_answers)
    n = len(gt_answers)
    return {a: (c * min(1.0, (c - 1) / 3.0) + (n - c) * min(1.0, c / 3.0)) / n for a, c in counts.items()}


def majority_answer(gt_answers: Sequence[str]) -> str:
    """Most frequent normalised answer; ties broken by the lexicographically smallest (deterministic)."""
    counts = Counter(normalize_answer(a) for a in gt_answers)
    return min(counts, key=lambda a: (-counts[a], a))


def vqa_report(predictions: Sequence[str], questions: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Aggregate official accuracies (percent).

    ``questions[i]`` has ``answers`` (list of human answers) and optionally ``question_type`` / ``answer_type``.
    Returns ``{"accuracy": overall, "acc_qtype/<t>": ..., "acc_atype/<t>": ..., "n": N}``.
    """
    if len(predictions) != len(questions):
        raise ValueError(f"{len(predictions)} predictions for {len(questions)} questions")
    if not questions:
        raise ValueError("vqa_report: no questions")
    per_q = [vqa_accuracy(p, q["answers"]) for p, q in zip(predictions, questions)]
    out = {"accuracy": 100.0 * sum(per_q) / len(per_q)}
    for field, prefix in (("question_type", "acc_qtype"), ("answer_type", "acc_atype")):
        groups: dict[str, list[float]] = defaultdict(list)
        for acc, q in zip(per_q, questions):
            if q.get(field) is not None:
                groups[str(q[field])].append(acc)
        for name in sorted(groups):
            out[f"{prefix}/{name}"] = 100.0 * sum(groups[name]) / len(groups[name])
    return out


def majority_baseline(train_answers: Sequence[Sequence[str]], questions: Sequence[Mapping[str, Any]],
                      by: Optional[str] = None) -> float:
    """Accuracy (percent) of always answering the most frequent training answer (per ``by`` group, e.g.
    ``question_type``, when given; the global one for unseen groups). ``train_answers``: answers per training
    question, each list paired with ``questions``-like dicts only when ``by`` is used (pass (answers, group))."""
    if by is None:
        counts = Counter(majority_answer(a) for a in train_answers)
        best = min(counts, key=lambda a: (-counts[a], a))
        preds = [best] * len(questions)
    else:
        groups: dict[str, Counter] = defaultdict(Counter)
        overall: Counter = Counter()
        for answers, group in train_answers:
            groups[group][majority_answer(answers)] += 1
            overall[majority_answer(answers)] += 1
        best = {g: min(c, key=lambda a: (-c[a], a)) for g, c in groups.items()}
        fallback = min(overall, key=lambda a: (-overall[a], a))
        preds = [best.get(q.get(by), fallback) for q in questions]
    return vqa_report(preds, questions)["accuracy"]


# ------------------------------------------------------------------------------------ model evaluation
def find_head(model, cls_name: str):
    """The first head of ``model`` whose class is named ``cls_name`` (None when absent)."""
    for head in getattr(model, "heads", {}).values():
        if type(head).__name__ == cls_name:
            return head
    return None


def load_vqa_items(shards, preprocessor, media: str, languages: Optional[Sequence[str]] = None,
                   skipped: Optional[Counter] = None) -> list[dict]:
    """One item per (question sample, language): ``{"key", "lang", "media": Tensor, "question", "answers",
    "question_type", "answer_type"}``, in shard order. Samples left out are counted per reason in ``skipped``
    (``no question``, ``no <media>``, ``truncated shard``, the decoders' reasons), each reason logged once."""
    import logging

    from mlmm.data.shards import iter_samples, resolve_shards
    from mlmm.data.transforms import SampleError

    shards = resolve_shards(shards) if isinstance(shards, str) else list(shards)
    skipped = Counter() if skipped is None else skipped
    items = []
    for raw in iter_samples(shards, errors="yield"):
        meta = raw.get("json")
        try:
            if "__error__" in raw:  # the unreadable rest of a shard
                raise SampleError(raw["__error__"].partition(": ")[0], raw["__error__"])
            if not isinstance(meta, dict) or "__error__" in meta:
                raise SampleError("bad json", f"{raw['__key__']}: {meta.get('__error__', meta)}"
                                  if isinstance(meta, dict) else f"{raw['__key__']}: not a JSON object")
            if not meta.get("question") or not meta.get("answers"):
                raise SampleError("no question", f"{raw['__key__']}: no question / answers in its json")
            x = preprocessor.media(raw).get(media)
            if x is None:
                raise SampleError(f"no {media}", f"{raw['__key__']}")
        except SampleError as e:
            if not skipped[e.reason]:
                logging.getLogger(__name__).warning("vqa: skipping %s (further ones are only counted)", e)
            skipped[e.reason] += 1
            continue
        for lang, question in sorted(meta["question"].items()):
            if (languages and lang not in languages) or not meta["answers"].get(lang):
                continue
            items.append({"key": raw["__key__"], "lang": lang, "media": x, "question": question,
                          "answers": list(meta["answers"][lang]), "question_type": meta.get("question_type"),
                          "answer_type": meta.get("answer_type")})
    return items


def predict_answers(model, head, items: Sequence[dict], batch_size: int = 64, device="cpu") -> list[str]:
    import torch

    from mlmm.data.preprocess import Preprocessor

    pre = Preprocessor(model.cfg, model.tokenizer, train=False)
    dtype = next(model.parameters()).dtype
    preds: list[str] = []
    with torch.no_grad():
        for i in range(0, len(items), batch_size):
            chunk = items[i:i + batch_size]
            x = torch.stack([it["media"] for it in chunk]).to(device, dtype)
            ids, att = pre.tokenize([it["question"] for it in chunk])
            _, mt, mm = model.encode_tokens(head.cfg.media, x)
            _, tt, tm = model.encode_tokens("text", ids.to(device), att.to(device))
            preds += head.predict(head.logits(tt, tm, mt, mm))
    return preds


def evaluate_vqa(model, shards, *, languages: Optional[Sequence[str]] = None, dataset: str = "",
                 batch_size: int = 64, device="cpu", progress: bool = True) -> list[dict]:
    """One ``vqa`` record per language: official accuracy overall / per question type / per answer type, plus
    ``acc_majority`` = always answering that language's most frequent answer of the evaluated set (an optimistic
    prior baseline) and ``acc_majority_qtype`` (same, per question type)."""
    from mlmm.data.preprocess import Preprocessor
    from mlmm.evaluation.retrieval import result_record

    head = find_head(model, "VQAHead")
    if head is None:
        raise ValueError("evaluate_vqa: the model has no vqa head")
    model.eval()
    pre = Preprocessor(model.cfg, model.tokenizer, train=False)
    skipped: Counter = Counter()
    items = load_vqa_items(shards, pre, head.cfg.media, languages, skipped)
    records = []
    langs = sorted({it["lang"] for it in items})
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    for lang in tqdm(langs, desc="vqa", disable=not progress, leave=False):
        subset = [it for it in items if it["lang"] == lang]
        preds = predict_answers(model, head, subset, batch_size, device)
        metrics = vqa_report(preds, subset)
        answers = [it["answers"] for it in subset]
        metrics["acc_majority"] = majority_baseline(answers, subset)
        metrics["acc_majority_qtype"] = majority_baseline([(it["answers"], it["question_type"]) for it in subset],
                                                          subset, by="question_type")
        records.append({**result_record("vqa", dataset, lang, metrics, n=len(subset)), "skipped": dict(skipped)})
    return records
