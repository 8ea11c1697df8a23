"""mlmm: multilingual multimodal pretraining and distillation on WebDataset + DeepSpeed ZeRO.

    import mlmm
    model = mlmm.from_pretrained("runs/demo/export")        # or a Hub repo id: mlmm.from_pretrained("org/name")
    z = model.encode_text(["a red circle", "ein roter Kreis"])
"""
__version__ = "0.1.0"


def from_pretrained(name_or_path, device="cpu", *, revision=None, cache_dir=None, token=None):
    """Load an mlmm export: a local folder (config.json + model.safetensors + tokenizer) or a Hugging Face Hub
    repo id (``huggingface_hub.snapshot_download``; with ``HF_HUB_OFFLINE=1`` from the local cache only)."""
    from mlmm.hub import from_pretrained as _from_pretrained

    return _from_pretrained(name_or_path, device=device, revision=revision, cache_dir=cache_dir, token=token)


__all__ = ["__version__", "from_pretrained"]
