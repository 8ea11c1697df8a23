"""Publish an mlmm checkpoint to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

    python -m mlmm.hub.publish --checkpoint runs/demo/run --repo-id org/name [--private] [--results results.json]
    python -m mlmm.hub.publish --checkpoint runs/demo/run --repo-id org/name --dry-run --out hub/name   # no network

``--checkpoint`` is an export folder or a run folder holding ``export/``. The folder that is uploaded holds:

* the mlmm export (``config.json``, ``model.safetensors``, tokenizer files): ``mlmm.from_pretrained("org/name")``;
* ``README.md``: the model card with YAML metadata (license, languages, tags, datasets, ``model-index`` from the
  eval suite's ``results.json``), validated offline with ``huggingface_hub.ModelCard``;
* where the towers allow it (see :mod:`mlmm.hub.interop_open_clip`): ``open_clip_config.json`` +
  ``open_clip_model.safetensors`` for ``open_clip.create_model_and_transforms("hf-hub:org/name")``;
* with a text tower: ``text/``, a plain transformers folder
  (``AutoModel.from_pretrained("org/name", subfolder="text")``).

``--dry-run`` builds and validates that folder and stops. Without ``--dry-run`` a token is required (``HF_TOKEN`` or
``hf auth login``); without one the command fails before building anything.
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Sequence

from mlmm.hub.card import build_model_card, load_records, records_to_eval_results, validate_model_card
from mlmm.hub.export import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, load_export, read_config
from mlmm.hub.interop_open_clip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, export_open_clip, open_clip_problems
from mlmm.hub.interop_transformers import export_transformers_text

log = logging.getLogger("mlmm")
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*$")
MARKER = ".mlmm_hub"  # marks a folder this module built (safe to rebuild); never uploaded
_NOT_COPIED = (CARD_NAME, OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, MARKER)


class PublishError(RuntimeError):
    """A problem that stops publishing (no token, bad repo id, not an export, ...)."""


def find_export(checkpoint: str | Path) -> Path:
    """``checkpoint`` itself when it is an export folder, else ``checkpoint/export``."""
    path = Path(checkpoint)
    for cand in (path, path / "export"):
        if (cand / CONFIG_NAME).is_file() and (cand / WEIGHTS_NAME).is_file():
            return cand
    raise PublishError(f"--checkpoint {path}: neither it nor {path / 'export'} is an mlmm export "
                       f"({CONFIG_NAME} + {WEIGHTS_NAME}); train with recipes/train.py or use mlmm.hub.save_pretrained")


def _prepare_out(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise PublishError(f"--out {out}: exists, is not empty and was not built by mlmm.hub.publish; "
                               "choose an empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("built by mlmm.hub.publish\n", encoding="utf-8")


def expected_files(formats: Sequence[str]) -> list[str]:
    files = [CONFIG_NAME, WEIGHTS_NAME, CARD_NAME]
    if "open_clip" in formats:
        files += [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
    if "transformers" in formats:
        files += ["text/config.json", "text/model.safetensors", "text/mlmm_text.json", "text/projection.safetensors",
                  "text/mlmm_text_encoder.py", "text/tokenizer_config.json"]
    return files


def build_hub_folder(checkpoint: str | Path, out_dir: str | Path, *, repo_id: str,
                     results: Optional[str | Path] = None, license: Optional[str] = "apache-2.0",
                     languages: Optional[Sequence[str]] = None, datasets: Optional[Sequence[str]] = None,
                     tags: Sequence[str] = (), interop: bool = True) -> dict[str, Any]:
    """Write the folder to upload into ``out_dir`` and validate it; returns a summary dict."""
    if not REPO_ID.match(repo_id):
        raise PublishError(f"--repo-id {repo_id!r}: expected 'org/name' (letters, digits, '-', '_', '.')")
    export = find_export(checkpoint)
    if results is None and (Path(checkpoint) / "results.json").is_file():
        results = Path(checkpoint) / "results.json"
    records = load_records(results) if results else []
    out = Path(out_dir)
    _prepare_out(out)
    for f in export.iterdir():  # the mlmm export, minus its card and any earlier interop files
        if f.is_file() and f.name not in _NOT_COPIED:
            shutil.copy2(f, out / f.name)
    model = load_export(out)  # also proves the copied export loads
    formats: list[str] = []
    if interop and "text" in model.towers and not hasattr(model.towers["text"], "model"):
        log.info("no transformers text export: text arch %r is mlmm's native tower", model.cfg.text.arch)
    elif interop and "text" in model.towers and model.cfg.text.pooling not in ("mean", "cls"):
        log.info("no transformers text export: text pooling %r is not mean/cls", model.cfg.text.pooling)
    elif interop and "text" in model.towers:
        export_transformers_text(model, out / "text")
        formats.append("transformers")
    if interop:
        problems = open_clip_problems(model)
        if problems:
            log.info("no open_clip export: %s", "; ".join(problems))
        else:
            export_open_clip(model, out, hf_model_name=repo_id)
            formats.append("open_clip")
    config = read_config(out)
    card = build_model_card(config, records, repo_id=repo_id, license=license, languages=languages,
                            datasets=datasets, tags=tags, formats=formats)
    (out / CARD_NAME).write_text(card, encoding="utf-8")
    require = ("license", "language") if "text" in model.towers else ("license",)
    validate_model_card(card, require=require, n_eval_results=len(records_to_eval_results(records)))
    missing = [f for f in expected_files(formats) if not (out / f).is_file()]
    if missing:
        raise PublishError(f"{out}: incomplete folder, missing {missing}")
    return {"folder": str(out), "export": str(export), "repo_id": repo_id, "formats": formats,
            "n_eval_results": len(records_to_eval_results(records)),
            "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != MARKER)}


def require_token(token: Optional[str] = None) -> str:
    """The Hub token (argument, ``HF_TOKEN`` or the saved login), or a PublishError saying how to get one."""
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise PublishError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access); "
                           "use --dry-run to build and validate the folder without uploading")
    return token


def upload(folder: str | Path, repo_id: str, *, token: str, private: bool = False,
           commit_message: str = "Upload mlmm model") -> str:
    """``create_repo`` (exist_ok) + ``upload_folder``; returns the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder), commit_message=commit_message,
                      ignore_patterns=[MARKER])
    return str(url)


def publish(checkpoint: str | Path, repo_id: str, *, private: bool = False, results: Optional[str | Path] = None,
            dry_run: bool = False, out_dir: Optional[str | Path] = None, token: Optional[str] = None,
            commit_message: str = "Upload mlmm model", **card: Any) -> dict[str, Any]:
    """Build (and unless ``dry_run``, upload) the Hub folder; ``card`` goes to :func:`build_hub_folder`."""
    if not dry_run:
        token = require_token(token)  # fail before any work
    tmp = None
    if out_dir is None:
        if dry_run:
            out_dir = find_export(checkpoint).parent / f"hub-{repo_id.split('/')[-1]}"
        else:
            tmp = out_dir = tempfile.mkdtemp(prefix="mlmm-hub-")
    try:
        summary = build_hub_folder(checkpoint, out_dir, repo_id=repo_id, results=results, **card)
        if not dry_run:
            summary["url"] = upload(out_dir, repo_id, token=token, private=private, commit_message=commit_message)
        return summary
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _csv(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="export folder, or a run folder holding export/")
    p.add_argument("--repo-id", required=True, help="org/name on the Hugging Face Hub")
    p.add_argument("--private", action="store_true", help="create the repo as private")
    p.add_argument("--results", help="eval suite results.json for the card's model-index (default RUN/results.json)")
    p.add_argument("--dry-run", action="store_true", help="build + validate the folder only (no network)")
    p.add_argument("--out", help="where to build the folder (default: a temp dir, or EXPORT/../hub-NAME for --dry-run)")
    p.add_argument("--license", default="apache-2.0", help="Hub license id (default apache-2.0)")
    p.add_argument("--language", help="comma-separated ISO codes added to the card's languages")
    p.add_argument("--datasets", help="comma-separated Hub dataset ids trained on")
    p.add_argument("--tags", help="comma-separated extra tags")
    p.add_argument("--no-interop", action="store_true", help="skip the open_clip and transformers exports")
    p.add_argument("--commit-message", default="Upload mlmm model")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = publish(args.checkpoint, args.repo_id, private=args.private, results=args.results,
                          dry_run=args.dry_run, out_dir=args.out, commit_message=args.commit_message,
                          license=args.license, languages=_csv(args.language), datasets=_csv(args.datasets),
                          tags=_csv(args.tags) or (), interop=not args.no_interop)
    except PublishError as e:
        print(f"error: {e}")
        return 2
    print(f"{'built (dry run)' if args.dry_run else 'published'}: {summary.get('url', summary['folder'])} "
          f"[formats: mlmm{''.join(', ' + f for f in summary['formats'])}; "
          f"{summary['n_eval_results']} eval results in the card]")
    for f in summary["files"]:
        print(f"  {f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
