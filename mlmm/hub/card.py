"""Model cards (``README.md``) with Hub YAML metadata, and their offline validation.

    text = build_model_card(config, records, repo_id="org/name", license="apache-2.0", formats=("open_clip",))
    card = validate_model_card(text, require=("license", "language"))   # huggingface_hub.ModelCard, no network

Metadata: ``library_name: mlmm``, ``license``, ``language`` (ISO 639 codes: the eval languages, the training shards'
languages and any given ones), ``tags``, ``datasets`` (Hub dataset ids), ``base_model`` (the text tower's Hub model,
when it started from one) and ``model-index`` built from the eval suite's ``results.json`` records
``{"task", "dataset", "language", "n", "metrics"}``: one result per (task, dataset, language) with every metric
except the ``chance*`` baselines. The body lists the towers, the files and how to load them with each library.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

from mlmm.modalities import MEDIA, MODALITIES
from mlmm.modalities import modality as spec_of

LANG_CODE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
SPECIAL_LANGUAGES = ("multilingual", "code")
DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
BASE_TAGS = ["mlmm", "multimodal", "multilingual", "contrastive"]
FORMAT_TAGS = {"open_clip": ["open_clip", "clip"], "transformers": ["transformers", "feature-extraction"]}


def _task_type(task: str) -> str:
    """mlmm record task -> model-index task type ("image-text" -> "image-text-retrieval", "vqa" -> ...)."""
    if task == "vqa":
        return "visual-question-answering"
    if task.endswith("captioning"):
        return f"{task.split('-')[0]}-to-text" if "-" in task else "image-to-text"
    base = task.split("+")[0]
    return f"{base}-retrieval" if "-" in base and not base.endswith("hashing") else base


def records_to_eval_results(records: Iterable[Mapping[str, Any]]) -> list:
    """Eval records -> ``huggingface_hub.EvalResult`` list (``dataset_config`` = the language)."""
    from huggingface_hub import EvalResult

    out = []
    for i, r in enumerate(records):
        for key in ("task", "dataset", "language", "metrics"):
            if key not in r:
                raise ValueError(f"results record {i}: missing {key!r} (expected the results.json schema "
                                 "{task, dataset, language, n, metrics})")
        for name, value in r["metrics"].items():
            if str(name).startswith("chance") or value is None:
                continue
            out.append(EvalResult(task_type=_task_type(str(r["task"])), task_name=str(r["task"]),
                                  dataset_type=str(r["dataset"]), dataset_name=str(r["dataset"]),
                                  dataset_config=str(r["language"]), metric_type=str(name),
                                  metric_name=str(name), metric_value=round(float(value), 4)))
    return out


def load_records(path: str | Path) -> list[dict[str, Any]]:
    """``{"results": [...]}`` (or a bare list) from a results.json, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: results file not found")
    raw = json.loads(path.read_text(encoding="utf-8"))
    records = raw.get("results") if isinstance(raw, dict) else raw
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected {{\"results\": [records]}} as written by the eval suite")
    return records


def _shard_languages(config: Mapping[str, Any]) -> list[str]:
    """Languages listed in the training shards' index.json, when that folder is still on disk."""
    data = (config.get("train_config") or {}).get("data") or {}
    if data.get("languages"):
        return list(data["languages"])
    shards = str(data.get("train_shards") or "")
    index = Path(shards) / "index.json" if shards and "," not in shards else None
    if index is not None and index.is_file():
        try:
            return list(json.loads(index.read_text(encoding="utf-8")).get("languages") or [])
        except (ValueError, OSError):
            return []
    return []


def card_languages(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = (),
                   extra: Optional[Sequence[str]] = None) -> list[str]:
    """ISO codes from ``extra``, the eval records and the training shards (anything else is dropped)."""
    seen = list(extra or []) + [str(r.get("language", "")) for r in records] + _shard_languages(config)
    return [x for x in dict.fromkeys(seen) if LANG_CODE.match(x) or x in SPECIAL_LANGUAGES]


def card_metadata(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = (), *,
                  repo_id: Optional[str] = None, license: Optional[str] = None,
                  languages: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                  tags: Sequence[str] = (), formats: Sequence[str] = ()):
    """The card's YAML metadata as a ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    for d in datasets or []:
        if not DATASET_ID.match(d):
            raise ValueError(f"datasets: {d!r} is not a Hub dataset id ('org/name')")
    modalities = list(config.get("modalities") or [])
    all_tags = BASE_TAGS + [spec_of(m).text_task for m in modalities
                            if m in MEDIA and "text" in modalities]
    for f in formats:
        all_tags += FORMAT_TAGS.get(f, [f])
    eval_results = records_to_eval_results(records) or None
    name = repo_id.split("/")[-1] if repo_id else str(config.get("name", "mlmm-model"))
    return ModelCardData(
        library_name="mlmm", license=license, language=card_languages(config, records, languages) or None,
        tags=list(dict.fromkeys(all_tags + list(tags))), datasets=list(datasets) if datasets else None,
        base_model=config.get("text_base_model"), pipeline_tag="feature-extraction",
        model_name=name if eval_results else None, eval_results=eval_results)


def _usage(where: str, formats: Sequence[str], modalities: Sequence[str]) -> list[str]:
    lines = ["## Usage", "", "```python", "import mlmm", "", f"model = mlmm.from_pretrained({where!r})"]
    if "text" in modalities:
        lines.append('z_text = model.encode_text(["a red circle", "ein roter Kreis"])   # [2, E], L2-normalised')
    for m in modalities:
        if m != "text":
            what = spec_of(m).input if m in MODALITIES else f"a {m} tensor"
            lines.append(f'z_{m} = model.encode("{m}", x)   # x: [B, ...], each {what} -> [B, E]')
    lines.append("```")
    if "open_clip" in formats:
        spec = f"hf-hub:{where}" if "/" in where and not where.startswith(("/", ".")) else f"local-dir:{where}"
        lines += ["", "With open_clip (`open_clip_config.json` + `open_clip_model.safetensors`):", "", "```python",
                  "import open_clip", "",
                  f'model, _, preprocess = open_clip.create_model_and_transforms("{spec}")',
                  "model.eval()   # open_clip returns the model in train mode (dropout on)",
                  f'tokenizer = open_clip.get_tokenizer("{spec}")',
                  'z_text = model.encode_text(tokenizer(["a red circle"]), normalize=True)', "```"]
    if "transformers" in formats:
        lines += ["", "With transformers (the text tower in `text/`, M-CLIP style: encoder + pooling + projection):",
                  "", "```python", "from transformers import AutoModel, AutoTokenizer", "",
                  f'encoder = AutoModel.from_pretrained({where!r}, subfolder="text")',
                  f'tokenizer = AutoTokenizer.from_pretrained({where!r}, subfolder="text")',
                  "# pooling + projection: text/mlmm_text.json, text/projection.safetensors;",
                  "# text/mlmm_text_encoder.py does both (MlmmTextEncoder.from_pretrained(folder).encode(texts))",
                  "```"]
    return lines


def describe_teacher(t: Mapping[str, Any]) -> str:
    """One line naming a distillation teacher from its identity record (``Teacher.identity()``)."""
    if t.get("kind") == "hf_text":
        parts = [f"sentence encoder `{t.get('model')}`"]
    else:
        parts = [f"open_clip `{t.get('arch')}`"]
        if t.get("pretrained"):
            parts.append(f"pretrained `{t['pretrained']}`")
        if t.get("hub"):
            parts.append(f"from the Hub repo `{t['hub']}`" + (f" at `{t['revision']}`" if t.get("revision") else ""))
        if t.get("random_init"):
            parts.append("**randomly initialised** (a test teacher)")
        if t.get("sha256"):
            parts.append(f"weights `{t.get('file', '')}` sha256 `{t['sha256']}`")
    parts.append(f"fingerprint `{t.get('fingerprint')}`")
    return ", ".join(parts)


def build_model_card(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]] = (), *,
                     results_md: Optional[str] = None, repo_id: Optional[str] = None, license: Optional[str] = None,
                     languages: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                     tags: Sequence[str] = (), formats: Sequence[str] = ()) -> str:
    """README.md text: YAML metadata (see :func:`card_metadata`) + description, files, usage, evaluation."""
    data = card_metadata(config, records, repo_id=repo_id, license=license, languages=languages,
                         datasets=datasets, tags=tags, formats=formats)
    model = config["model"]
    modalities = list(config.get("modalities") or [m for m in MODALITIES
                                                    if model.get(m) or (model.get("more") or {}).get(m)])
    title = repo_id or str(config.get("name", "mlmm model"))
    lines = ["---", data.to_yaml(), "---", f"# {title}", "",
             f"Multimodal embedding model trained with mlmm. Towers: {', '.join(modalities)}; "
             f"embedding size {model['embed_dim']}. Every tower maps its input to a shared L2-normalised space.", ""]
    train = config.get("train_config") or {}
    if train:
        loss = (train.get("loss") or {}).get("name", "?")
        t, d = train.get("train") or {}, train.get("data") or {}
        lines += [f"Trained for {t.get('max_steps', '?')} steps, batch size {d.get('batch_size', '?')}, "
                  f"loss `{loss}`.", ""]
    for teacher in config.get("teachers") or []:
        lines += [f"Distilled from a frozen teacher: {describe_teacher(teacher)}.", ""]
    files = ["- `config.json`, `model.safetensors`, tokenizer files: the mlmm model (`mlmm.from_pretrained`)."]
    if "open_clip" in formats:
        files.append("- `open_clip_config.json`, `open_clip_model.safetensors`: the image and text towers as an "
                     "open_clip `CustomTextCLIP` (the text tower's transformers config is merged into `config.json`).")
    if "transformers" in formats:
        files.append("- `text/`: the text tower as a plain transformers folder, plus its pooling and projection.")
    lines += ["## Files", "", *files, ""]
    lines += _usage(repo_id or "path/to/this/folder", formats, modalities)
    if records and not results_md:
        from mlmm.evaluation.report import markdown_table

        results_md = markdown_table(records)
    if results_md:
        lines += ["", "## Evaluation", "", results_md.rstrip()]
    return "\n".join(lines) + "\n"


def validate_model_card(text: str, *, require: Sequence[str] = (), n_eval_results: Optional[int] = None):
    """Parse ``text`` with ``huggingface_hub.ModelCard`` (offline) and check what the Hub would reject.

    Checks: a YAML block that parses; ``model-index`` that parses into eval results (and their count, when given);
    language codes are ISO 639; ``datasets`` are Hub ids; every field in ``require`` is set; the card survives a
    YAML round trip. Returns the ModelCard; raises ``ValueError`` listing every problem.
    """
    from huggingface_hub import ModelCard

    if not text.startswith("---"):
        raise ValueError("model card: no YAML metadata block at the top (the file must start with '---')")
    try:
        card = ModelCard(text)
    except Exception as e:  # noqa: BLE001 - yaml / model-index errors all mean "invalid card"
        raise ValueError(f"model card: metadata does not parse: {e}") from e
    data, problems = card.data, []
    langs = data.language if isinstance(data.language, list) else [data.language] if data.language else []
    problems += [f"language {x!r} is not an ISO 639 code" for x in langs
                 if not (LANG_CODE.match(str(x)) or x in SPECIAL_LANGUAGES)]
    dsets = data.datasets if isinstance(data.datasets, list) else [data.datasets] if data.datasets else []
    problems += [f"datasets entry {x!r} is not a Hub dataset id" for x in dsets if not DATASET_ID.match(str(x))]
    problems += [f"{field} is not set" for field in require if not getattr(data, field, None)]
    n = len(data.eval_results or [])
    if n_eval_results is not None and n != n_eval_results:
        problems.append(f"model-index has {n} results, expected {n_eval_results}")
    if ModelCard(str(card)).data.to_dict() != data.to_dict():
        problems.append("metadata does not survive a YAML round trip")
    if problems:
        raise ValueError("model card: " + "; ".join(problems))
    return card
