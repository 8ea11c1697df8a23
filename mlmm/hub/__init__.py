"""Checkpoints on disk and on the Hugging Face Hub, and their use from open_clip / transformers.

    save_pretrained(model, "runs/x/export", run_config=cfg)   # config.json + model.safetensors + tokenizer + README.md
    model = from_pretrained("runs/x/export")                  # or "org/name" (snapshot_download; offline from cache)
    export_open_clip(model, "runs/x/export")                  # + open_clip_config.json + open_clip_model.safetensors
    export_transformers_text(model, "runs/x/text")            # plain transformers folder + projection (M-CLIP style)
    python -m mlmm.hub.publish --checkpoint runs/x --repo-id org/name [--private] [--results r.json] [--dry-run]

Modules: :mod:`~mlmm.hub.export` (the folder format), :mod:`~mlmm.hub.download` (repo id -> folder),
:mod:`~mlmm.hub.card` (model card + offline validation), :mod:`~mlmm.hub.interop_open_clip`,
:mod:`~mlmm.hub.interop_transformers` (+ the standalone :mod:`~mlmm.hub.text_encoder`), :mod:`~mlmm.hub.publish`.
"""
from mlmm.hub.card import build_model_card, validate_model_card
from mlmm.hub.download import from_pretrained, resolve_pretrained
from mlmm.hub.export import (CARD_NAME, CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, load_export, load_model_config,
                             load_state_dict, save_pretrained)
from mlmm.hub.interop_open_clip import (NotOpenClipCompatible, export_open_clip, is_open_clip_source,
                                        load_open_clip_into, open_clip_problems)
from mlmm.hub.interop_transformers import export_transformers_text

__all__ = [
    "CARD_NAME", "CONFIG_NAME", "FORMAT_VERSION", "WEIGHTS_NAME", "NotOpenClipCompatible", "build_model_card",
    "export_open_clip", "export_transformers_text", "from_pretrained", "is_open_clip_source", "load_export",
    "load_model_config", "load_open_clip_into", "load_state_dict", "open_clip_problems", "resolve_pretrained",
    "save_pretrained", "validate_model_card",
]
