"""Tiny saved models of every kind the eval suite loads (mlmm export / run folder, open_clip by architecture,
local-dir and hf-hub, transformers CLIPModel, M-CLIP folder, mlmm text export) over one small shard set."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

OC_CFG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
          "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
OC_ARCH = "MlmmTestTinyViT"


def build_shards(root: Path, n_images: int = 16):
    """Generated shapes (en/de/fr captions, 32 px) in 2 shards + a BPE tokenizer trained on their captions."""
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards

    rows = generate(root / "gen", n_images=n_images, n_videos=0, n_audio=0, size=32, seed=3, progress=False)
    write_shards(root / "gen" / "manifest.jsonl", root / "shards", shard_size=n_images // 2, progress=False)
    train_tokenizer([c for r in rows for caps in r["captions"].values() for c in caps], root / "tok", vocab_size=150)
    return rows


def mlmm_run(root: Path) -> Path:
    """A run folder holding export/ (an image + text mlmm model)."""
    from transformers import AutoTokenizer

    from mlmm.config import build_config
    from mlmm.hub import save_pretrained
    from mlmm.models.model import MultimodalModel

    cfg = build_config({"name": "tiny", "model": {
        "embed_dim": 16, "image": {"image_size": 32, "patch_size": 8, "width": 16, "layers": 1, "heads": 2},
        "text": {"tokenizer": str(root / "tok"), "hidden": 16, "layers": 1, "heads": 2, "intermediate": 32,
                 "max_length": 16}}})
    torch.manual_seed(0)
    model = MultimodalModel(cfg.model, AutoTokenizer.from_pretrained(str(root / "tok")))
    save_pretrained(model, root / "run" / "export", run_config=cfg)
    (root / "run" / "checkpoints").mkdir()
    return root / "run"


def open_clip_models(root: Path) -> dict[str, Path]:
    """TinyViT config dir + a weights file (open_clip:ARCH,pretrained=FILE), a local-dir folder and an HF cache
    (``hf_home/hub``) holding the same folder as repo ``org/tiny-oc``."""
    import open_clip
    from safetensors.torch import save_file

    cfg_dir = root / "oc_configs"
    cfg_dir.mkdir()
    (cfg_dir / f"{OC_ARCH}.json").write_text(json.dumps(OC_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(1)
    model = open_clip.create_model(OC_ARCH)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(sd, root / "oc_tiny.pt")
    folder = root / "oc_local"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": OC_CFG, "preprocess_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}))
    save_file(sd, str(folder / "open_clip_model.safetensors"))
    from hf_cache import put_in_hf_cache

    put_in_hf_cache(root / "hf_home" / "hub", "org/tiny-oc", folder)  # tests/hf_cache.py: huggingface_hub's layout
    return {"configs": cfg_dir, "weights": root / "oc_tiny.pt", "local": folder, "hf_home": root / "hf_home"}


def transformers_clip(root: Path) -> Path:
    """A saved transformers CLIPModel (+ tokenizer + CLIPImageProcessor)."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=32, pad_token_id=tok.pad_token_id),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2), projection_dim=16)
    torch.manual_seed(2)
    out = root / "hf_clip"
    CLIPModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def mclip_folder(root: Path) -> Path:
    """An M-CLIP folder: config.json (model_type M-CLIP, modelBase = a local XLM-R config folder), weights
    ``transformer.*`` + ``LinearTransformation.*`` (pytorch_model.bin, as M-CLIP publishes them), tokenizer."""
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    tok = AutoTokenizer.from_pretrained(str(root / "tok"))
    out = root / "mclip"
    base = XLMRobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, max_position_embeddings=40, pad_token_id=tok.pad_token_id)
    base.save_pretrained(out / "base")
    torch.manual_seed(3)
    enc = XLMRobertaModel(base)  # with its pooler, as M-CLIP checkpoints hold it
    lin = torch.nn.Linear(32, 16)
    sd = {**{f"transformer.{k}": v for k, v in enc.state_dict().items()},
          **{f"LinearTransformation.{k}": v for k, v in lin.state_dict().items()}}
    torch.save(sd, out / "pytorch_model.bin")
    (out / "config.json").write_text(json.dumps({"model_type": "M-CLIP", "modelBase": "base",
                                                 "transformerDimensions": 32, "numDims": 16}))
    tok.save_pretrained(out)
    return out


def shapes_prompts(path: Path) -> Path:
    """A user prompts YAML: the 18 generated classes (colour + shape) in en / de / fr, with their own templates."""
    from mlmm.synthetic.shapes import COLORS, SHAPES

    ids = [f"{c} {s}" for c in COLORS for s in SHAPES]
    names = {"en": ids,
             "de": [f"{COLORS[c][1]}{'er' if SHAPES[s][1] == 'm' else 'es'} {SHAPES[s][0]}" for c in COLORS
                    for s in SHAPES],
             "fr": [f"{SHAPES[s][2]} {COLORS[c][2]}" for c in COLORS for s in SHAPES]}
    path.write_text(yaml.safe_dump({"datasets": {"shapes": {"label_key": "class", "ids": ids, "classes": names,
                                                            "templates": {"image": {"en": ["a {c}"], "de": ["ein {c}"],
                                                                                    "fr": ["un {c}"]}}}}},
                                   allow_unicode=True))
    return path
