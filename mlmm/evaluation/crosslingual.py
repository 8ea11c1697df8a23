"""Cross-lingual retrieval after distillation.

    records = parallel_text_retrieval(student, "multi30k/test_2016_flickr.jsonl", ["de", "fr"], "en")
    records = student_text_to_teacher_image(student, teacher, "shards/test", languages=["de", "fr"])

* ``text-text`` (parallel sentence retrieval): for each language L, queries = the captions in L, gallery =
  their parallel captions in the target language, both embedded by the student. Each JSONL line
  ``{"captions": {lang: str | [str]}}`` is one item; identical strings are merged into one query / gallery
  entry whose positives are all items they occur in (as the foundation's runner does for captions).
  Metrics per direction with :func:`retrieval_metrics`: ``src2tgt_*`` (L -> target), ``tgt2src_*``,
  ``mean_R@k``, ``rsum`` and the chance level of a random ranking (``chance_src2tgt_R@k``, ...).
* ``image-text`` with the student text tower against the FROZEN teacher image tower (M-CLIP's use: the student
  replaces CLIP's text encoder): same protocol and keys as :func:`mlmm.evaluation.runner.evaluate_retrieval`.

Texts are embedded through ``model.forward`` with ``batch.lang`` set, so language-specific heads (MLA's
language adapters) apply; for a model without heads this equals ``model.encode_text``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from mlmm.data.batch import Batch
from mlmm.evaluation.report import chance_recall
from mlmm.evaluation.retrieval import bidirectional_retrieval, result_record, retrieval_metrics


def load_student(path: str | Path, device="cpu"):
    """``mlmm.from_pretrained``, plus the case it cannot rebuild yet: a text tower initialised from a pretrained
    HF model (``model.text.pretrained``, e.g. the MiniLM student), whose architecture is not in the size fields
    of ``config.json``. Then the architecture comes from that recorded model folder and the weights (strictly)
    from the export.  TODO(hub): record the HF text config in exports so from_pretrained handles this itself."""
    import mlmm
    from mlmm.config_paths import resolve_package_path
    from mlmm.typed import from_dict
    from mlmm.config import ModelConfig
    from mlmm.hub import load_state_dict
    from mlmm.models.model import MultimodalModel

    try:
        return mlmm.from_pretrained(path, device=device)
    except (RuntimeError, ValueError) as first:
        raw = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        pretrained = (((raw.get("train_config") or {}).get("model") or {}).get("text") or {}).get("pretrained")
        if not pretrained:
            raise
        model_raw = dict(raw["model"])
        model_raw["text"] = {**model_raw["text"], "tokenizer": str(path),
                             "pretrained": resolve_package_path(pretrained, "text.pretrained")}
        cfg = from_dict(ModelConfig, model_raw, "model")
        from transformers import AutoTokenizer

        model = MultimodalModel(cfg, AutoTokenizer.from_pretrained(str(path)))
        try:
            model.load_state_dict(load_state_dict(Path(path) / "model.safetensors"), strict=True)
        except RuntimeError:
            raise first from None
        return model.to(device).eval()


@torch.no_grad()
def embed_texts_lang(model, texts: Sequence[str], lang: str, batch_size: int = 64, device="cpu") -> torch.Tensor:
    """Strings in language ``lang`` -> [N, E] student embeddings (through forward, so heads apply)."""
    model.eval()
    out = []
    for i in range(0, len(texts), batch_size):
        chunk = list(texts[i:i + batch_size])
        tok = model.tokenizer(chunk, padding=True, truncation=True, max_length=model.cfg.text.max_length,
                              return_tensors="pt")
        n = len(chunk)
        batch = Batch(keys=[f"q{i + j}" for j in range(n)], text_ids=tok["input_ids"].to(device),
                      text_attention=tok["attention_mask"].to(device),
                      text_mask=torch.ones(n, dtype=torch.bool, device=device), lang=[lang] * n, captions=chunk)
        out.append(model(batch)["text"].float().cpu())
    return torch.cat(out) if out else torch.empty(0, model.cfg.embed_dim)


def _positives(pairs: list[tuple[str, str]]) -> tuple[list[str], list[str], list[list[int]], list[list[int]]]:
    """Unique query and gallery strings and positives both ways, from (src, tgt) item pairs."""
    src_items, tgt_items = defaultdict(set), defaultdict(set)
    for i, (s, t) in enumerate(pairs):
        src_items[s].add(i)
        tgt_items[t].add(i)
    srcs, tgts = sorted(src_items), sorted(tgt_items)
    tgt_of_item = {i: j for j, t in enumerate(tgts) for i in tgt_items[t]}
    src_of_item = {i: j for j, s in enumerate(srcs) for i in src_items[s]}
    s2t = [sorted({tgt_of_item[i] for i in src_items[s]}) for s in srcs]
    t2s = [sorted({src_of_item[i] for i in tgt_items[t]}) for t in tgts]
    return srcs, tgts, s2t, t2s


def read_parallel_pairs(path: str | Path, lang: str, target: str) -> list[tuple[str, str]]:
    """(caption in ``lang``, caption in ``target``) per item of a parallel JSONL (i-th with i-th when both are
    lists of equal length, else every combination of the item's captions)."""
    pairs = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            caps = json.loads(line).get("captions") or {}
            a, b = caps.get(lang), caps.get(target)
            a = [a] if isinstance(a, str) else list(a or [])
            b = [b] if isinstance(b, str) else list(b or [])
            if not a or not b:
                continue
            pairs += list(zip(a, b)) if len(a) == len(b) else [(x, y) for x in a for y in b]
    return pairs


def text_text_metrics(src_emb: torch.Tensor, tgt_emb: torch.Tensor, s2t: list[list[int]], t2s: list[list[int]],
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    m = {}
    for name, q, g, pos in (("src2tgt", src_emb, tgt_emb, s2t), ("tgt2src", tgt_emb, src_emb, t2s)):
        m.update({f"{name}_{k}": v for k, v in retrieval_metrics(q, g, pos, ks=ks).items()})
        for k in ks:
            m[f"chance_{name}_R@{k}"] = sum(chance_recall(g.shape[0], len(p), k) for p in pos) / len(pos)
    for k in ks:
        m[f"mean_R@{k}"] = (m[f"src2tgt_R@{k}"] + m[f"tgt2src_R@{k}"]) / 2
    m["rsum"] = sum(m[f"{d}_R@{k}"] for d in ("src2tgt", "tgt2src") for k in ks)
    return m


def parallel_text_retrieval(model, path: str | Path, languages: Sequence[str], target_language: str = "en", *,
                            dataset: Optional[str] = None, batch_size: int = 64, device="cpu",
                            ks: Sequence[int] = (1, 5, 10), embed=None) -> list[dict]:
    """One ``text-text`` record per source language (``language`` = "<L>-<target>").

    ``embed(texts, lang) -> [N, E]`` overrides the student (e.g. to score the teacher itself as a baseline).
    """
    raw_embed = embed or (lambda texts, lang: embed_texts_lang(model, texts, lang, batch_size, device))
    cache: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}  # the target side is shared by all languages

    def embed(texts, lang):
        key = (lang, tuple(texts))
        if key not in cache:
            cache[key] = raw_embed(texts, lang)
        return cache[key]

    records = []
    for lang in languages:
        pairs = read_parallel_pairs(path, lang, target_language)
        if not pairs:
            continue
        srcs, tgts, s2t, t2s = _positives(pairs)
        metrics = text_text_metrics(embed(srcs, lang), embed(tgts, target_language), s2t, t2s, ks)
        metrics.update(n_queries=len(srcs), n_gallery=len(tgts))
        records.append(result_record("text-text", dataset or str(path), f"{lang}-{target_language}", metrics,
                                     n=len(pairs)))
    return records


def teacher_config_from_export(export_dir: str | Path):
    """The teacher a student was distilled from, read from its export's ``config.json`` (train_config.loss)."""
    from mlmm.typed import from_dict
    from mlmm.distill.teacher import TeacherConfig

    raw = json.loads((Path(export_dir) / "config.json").read_text(encoding="utf-8"))
    loss = (raw.get("train_config") or {}).get("loss") or {}
    for cfg in [loss, *(loss.get("terms") or {}).values()]:
        if isinstance(cfg, dict) and cfg.get("teacher"):
            return from_dict(TeacherConfig, cfg["teacher"], "teacher")
    raise ValueError(f"{export_dir}: config.json records no distillation teacher; pass --teacher")


def student_text_to_teacher_image(model, teacher, shards, *, languages: Optional[Sequence[str]] = None,
                                  dataset: str = "", batch_size: int = 64, device="cpu",
                                  ks: Sequence[int] = (1, 5, 10)) -> list[dict]:
    """``image-text`` records per language: student text(L) vs the frozen teacher's image embeddings."""
    from mlmm.data.preprocess import Preprocessor, load_eval_items
    from mlmm.evaluation.runner import chance_metrics, text_queries

    if not teacher.has_image:
        raise ValueError("--image-tower teacher: the teacher has no image tower")
    s = teacher.image_size
    pre = Preprocessor(model.cfg, model.tokenizer, train=False, extra_shapes={"image": (3, s, s)})
    items = load_eval_items(shards, pre, ["image"], languages)
    if "image" not in items:
        return []
    data = items["image"]["data"]
    x_emb = torch.cat([teacher.encode_image(data[i:i + batch_size].to(device)).float().cpu()
                       for i in range(0, len(data), batch_size)])  # [N, D]
    rows = {int(item): r for r, item in enumerate(items["image"]["items"])}
    records = []
    for lang in sorted(items["captions"]):
        texts, positives = text_queries(items["captions"][lang], rows)
        if not texts:
            continue
        t_emb = embed_texts_lang(model, texts, lang, batch_size, device)
        metrics = bidirectional_retrieval(x_emb, t_emb, positives.float().argmax(1), x_name="image", ks=ks,
                                          text_positives=positives)
        metrics.update(chance_metrics(positives, "i", ks))
        metrics["n_texts"] = len(texts)
        records.append(result_record("image-text", dataset, lang, metrics, n=len(rows)))
    return records
