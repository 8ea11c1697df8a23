"""Captioning metrics per language: pycocoevalcap BLEU-1..4, METEOR, ROUGE-L, CIDEr-D + sacrebleu BLEU / chrF.

    m = caption_metrics({"img1": "a red circle"}, {"img1": ["a red circle", "a red disc"]}, lang="en")

* **Tokenisation for the COCO metrics** (stated in the result as ``tokenization``):
  ``ptb`` — the Stanford PTB tokenizer shipped with pycocoevalcap (lower-case, punctuation removed), used for
  English when Java is available (the COCO caption protocol); ``simple`` — lower-case, Unicode punctuation removed,
  split on whitespace (space-delimited languages other than English, or English without Java); ``char`` — one
  token per character, spaces dropped, for languages written without spaces (zh, ja, th).
* **Scorers** are pycocoevalcap's own classes: ``Bleu(4)`` (corpus BLEU, "closest" reference length),
  ``Meteor`` (METEOR 1.5 jar, English resources: it needs Java — without Java METEOR is skipped with a warning),
  ``Rouge`` (ROUGE-L, beta 1.2) and ``Cider`` (which is CIDEr-D: clipped n-gram counts, Gaussian length
  penalty sigma 6, x10; document frequencies from the evaluated references).
* **sacrebleu** corpus BLEU and chrF on the raw (untokenised) strings with sacrebleu's own tokenizer:
  ``13a`` by default, ``zh`` for Chinese, ``ja-mecab`` for Japanese (when installed, else ``char``), ``char`` for Thai;
  the number of references is padded per sacrebleu's multi-reference convention.

Metric values are reported x100 (BLEU/METEOR/ROUGE-L/CIDEr-D/chrF in percent-like units as in papers).
"""
from __future__ import annotations

import logging
import shutil
import unicodedata
from typing import Mapping, Optional, Sequence

log = logging.getLogger(__name__)

CHAR_LANGUAGES = ("zh", "ja", "th")


def java_available() -> bool:
    return shutil.which("java") is not None


def coco_tokenization(lang: str, prefer_ptb: bool = True) -> str:
    base = lang.split("-")[0].split("_")[0].lower()
    if base in CHAR_LANGUAGES:
        return "char"
    if base == "en" and prefer_ptb and java_available():
        return "ptb"
    return "simple"


def sacrebleu_tokenizer(lang: str) -> str:
    base = lang.split("-")[0].split("_")[0].lower()
    if base == "zh":
        return "zh"
    if base == "ja":
        try:
            import MeCab  # noqa: F401  (sacrebleu[ja])
            return "ja-mecab"
        except ImportError:
            return "char"
    if base == "th":
        return "char"
    return "13a"


def simple_tokenize(text: str) -> str:
    """Lower-case, drop Unicode punctuation (category P*), collapse whitespace."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.lower())
    return " ".join(text.split())


def char_tokenize(text: str) -> str:
    """One token per non-space, non-punctuation character."""
    return " ".join(c for c in text.lower() if not c.isspace() and not unicodedata.category(c).startswith("P"))


def tokenize_corpus(texts: Mapping[str, Sequence[str]], method: str) -> dict[str, list[str]]:
    """{id: [strings]} -> {id: [tokenised strings]} with ``ptb`` | ``simple`` | ``char``."""
    if method == "ptb":
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({k: [{"caption": c} for c in v] for k, v in texts.items()})
    fn = {"simple": simple_tokenize, "char": char_tokenize}[method]
    return {k: [fn(c) for c in v] for k, v in texts.items()}


def coco_scores(gts: Mapping[str, list[str]], res: Mapping[str, list[str]], meteor: bool = True) -> dict[str, float]:
    """pycocoevalcap scorers on already tokenised ``gts`` {id: [refs]} / ``res`` {id: [hyp]}; raw (0..1, CIDEr
    0..10)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = dict(gts), dict(res)
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    out.update({f"BLEU-{i + 1}": float(b) for i, b in enumerate(bleu)})
    if meteor:
        if java_available():
            from pycocoevalcap.meteor.meteor import Meteor

            scorer = Meteor()
            try:
                out["METEOR"] = float(scorer.compute_score(gts, res)[0])
            finally:
                del scorer
        else:
            log.warning("java not found: METEOR skipped (BLEU, ROUGE-L, CIDEr-D still computed)")
    out["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr-D"] = float(Cider().compute_score(gts, res)[0])
    return out


def sacrebleu_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], lang: str) -> dict[str, float]:
    """Corpus BLEU and chrF with sacrebleu (references padded to the max count with empty strings, skipped)."""
    import sacrebleu

    n_refs = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(n_refs)]  # None = missing reference
    tok = sacrebleu_tokenizer(lang)
    bleu = sacrebleu.metrics.BLEU(tokenize=tok)
    chrf = sacrebleu.metrics.CHRF()
    return {"sacreBLEU": float(bleu.corpus_score(list(hyps), streams).score),
            "chrF": float(chrf.corpus_score(list(hyps), streams).score)}


def caption_metrics(predictions: Mapping[str, str], references: Mapping[str, Sequence[str]], lang: str = "en", *,
                    tokenization: Optional[str] = None, meteor: bool = True) -> tuple[dict[str, float], dict]:
    """All metrics for one language. Returns ``(metrics x100, info)``; ``info`` says which tokenisation was used.

    ``predictions``: {id: generated caption}; ``references``: {id: [reference captions]} (same ids).
    """
    if set(predictions) != set(references):
        raise ValueError("caption_metrics: predictions and references must have the same ids")
    if not predictions:
        raise ValueError("caption_metrics: nothing to score")
    ids = sorted(predictions)
    method = tokenization or coco_tokenization(lang)
    gts = tokenize_corpus({i: list(references[i]) for i in ids}, method)
    res = tokenize_corpus({i: [predictions[i]] for i in ids}, method)
    raw = coco_scores(gts, res, meteor=meteor)
    metrics = {k: 100.0 * v for k, v in raw.items()}
    metrics.update(sacrebleu_scores([predictions[i] for i in ids], [list(references[i]) for i in ids], lang))
    info = {"tokenization": method, "sacrebleu_tokenize": sacrebleu_tokenizer(lang),
            "meteor": "METEOR" in raw}
    return metrics, info


# ------------------------------------------------------------------------------------ model evaluation
def generate_captions(model, head, data, langs: Sequence[str], *, method: str = "beam", beam_size: int = 3,
                      batch_size: int = 32, device="cpu") -> list[str]:
    """Captions for preprocessed media ``data`` [N, ...] in languages ``langs`` [N]."""
    import torch

    dtype = next(model.parameters()).dtype
    out: list[str] = []
    with torch.no_grad():
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size].to(device, dtype)
            _, tokens, mask = model.encode_tokens(head.cfg.media, x)
            ids = head.generate(tokens, mask, list(langs[i:i + batch_size]), method=method, beam_size=beam_size)
            out += [model.tokenizer.decode(t, skip_special_tokens=True).strip() for t in ids]
    return out


def evaluate_captioning(model, shards, *, languages: Optional[Sequence[str]] = None, dataset: str = "",
                        method: str = "beam", beam_size: int = 3, batch_size: int = 32, device="cpu",
                        meteor: bool = True, progress: bool = True, examples: int = 3) -> list[dict]:
    """One ``<media>-captioning`` record per language the decoder knows and the shards caption: metrics of
    :func:`caption_metrics` plus ``info`` (tokenisation, decoding) and a few example captions."""
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.retrieval import result_record
    from mlmm.evaluation.vqa import find_head

    head = find_head(model, "CaptionHead")
    if head is None:
        raise ValueError("evaluate_captioning: the model has no caption head")
    model.eval()
    media = head.cfg.media
    pre = Preprocessor(model.cfg, model.tokenizer, train=False)
    items = load_eval_items(shards, pre, [media], languages)
    if media not in items:
        return []
    rows = {int(item): r for r, item in enumerate(items[media]["items"])}
    records = []
    langs = [lang for lang in sorted(items["captions"]) if lang in head.lang_index]
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        def tqdm(x, **_):
            return x
    for lang in tqdm(langs, desc="captioning", disable=not progress, leave=False):
        refs: dict[int, list[str]] = {}
        for item, cap in items["captions"][lang]:
            if item in rows:
                refs.setdefault(rows[item], []).append(cap)
        if not refs:
            continue
        order = sorted(refs)
        import torch

        data = items[media]["data"][torch.tensor(order, dtype=torch.long)]
        hyps = generate_captions(model, head, data, [lang] * len(order), method=method, beam_size=beam_size,
                                 batch_size=batch_size, device=device)
        keys = [items[media]["keys"][r] for r in order]
        metrics, info = caption_metrics(dict(zip(keys, hyps)), {k: refs[r] for k, r in zip(keys, order)}, lang,
                                        meteor=meteor)
        record = result_record(f"{media}-captioning", dataset, lang, metrics, n=len(order))
        record["skipped"] = dict(items.get("skipped", {}))
        record["info"] = {**info, "decoding": method if method == "greedy" else f"beam{beam_size}",
                          "examples": [{"key": k, "prediction": h, "reference": refs[r][0]}
                                       for k, h, r in list(zip(keys, hyps, order))[:examples]]}
        records.append(record)
    return records
