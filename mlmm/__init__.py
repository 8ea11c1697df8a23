"""mlmm: multilingual multimodal pretraining and distillation on WebDataset + DeepSpeed ZeRO.

    import mlmm
    model = mlmm.from_pretrained("runs/demo/export")
    z = model.encode_text(["a red circle", "ein roter Kreis"])
"""
__version__ = "0.1.0"


def from_pretrained(path, device="cpu"):
    """Load an mlmm export folder (config.json + model.safetensors + tokenizer)."""
    from mlmm.hub import from_pretrained as _from_pretrained

    return _from_pretrained(path, device=device)


__all__ = ["__version__", "from_pretrained"]
