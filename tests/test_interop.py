"""mlmm <-> open_clip / transformers: every export loads in the other library (offline, from a local folder) and
reproduces mlmm's embeddings to 1e-5; mlmm towers initialise from open_clip checkpoints."""
import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F

from mlmm.config import AudioTowerConfig, ImageTowerConfig, ModelConfig, TextTowerConfig
from mlmm.hub import (NotOpenClipCompatible, export_open_clip, export_transformers_text, from_pretrained,
                      save_pretrained)
from mlmm.models.model import MultimodalModel

TEXTS = ["a red circle", "ein roter Kreis auf blau", "un cercle rouge", "một hình tròn màu đỏ"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from mlmm.data.tokenization import train_tokenizer

    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([t.lower() for t in TEXTS] * 5, out, vocab_size=80)
    return out


def tiny_model(tok_dir, tmp_path, *, arch="bert", pooling="mean", pretrained=False, audio=False, heads=2, seed=0):
    """Image (32 px, width 32, 2 layers) + text (hidden 32, 2 layers) towers, embed 16; optionally a text tower
    started from a saved transformers folder (the distillation student case) and an audio tower."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    torch.manual_seed(seed)
    text = TextTowerConfig(tokenizer=str(tok_dir), arch=arch, pooling=pooling)
    if pretrained:  # a "pretrained" encoder on disk, e.g. a copy of MiniLM / XLM-R
        margin = tok.pad_token_id + 1 if "roberta" in arch else 0
        hf = AutoModel.from_config(AutoConfig.for_model(
            arch, vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=32 + margin + 2, pad_token_id=tok.pad_token_id))
        hf.save_pretrained(tmp_path / f"hf-{arch}")
        text.pretrained = str(tmp_path / f"hf-{arch}")
    cfg = ModelConfig(embed_dim=16, image=ImageTowerConfig(heads=heads), text=text,
                      audio=AudioTowerConfig(seconds=0.5) if audio else None)
    return MultimodalModel(cfg, tok).eval()


CASES = {"bert-mean": dict(arch="bert", pooling="mean", audio=True),
         "xlmr-cls-pretrained": dict(arch="xlm-roberta", pooling="cls", pretrained=True)}


@pytest.mark.parametrize("case", list(CASES))
def test_open_clip_local_dir_reproduces_embeddings(case, tok_dir, tmp_path, caplog):
    import open_clip
    from PIL import Image

    from mlmm.data.transforms import image_to_tensor

    model = tiny_model(tok_dir, tmp_path, **CASES[case])
    out = save_pretrained(model, tmp_path / "export")
    with caplog.at_level(logging.WARNING, logger="mlmm"):
        export_open_clip(model, out)
    assert ("left out: ['audio']" in caplog.text) == ("audio" in model.towers)
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    oc.eval()
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    images = torch.randn(3, 3, 32, 32)
    pil = Image.fromarray(torch.randint(0, 255, (40, 32, 3), dtype=torch.uint8).numpy())  # non-square photo
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_text(tokenizer(TEXTS), normalize=True), model.encode_text(TEXTS),
                                   rtol=0, atol=ATOL)
        torch.testing.assert_close(oc.encode_image(images, normalize=True), model.encode("image", images),
                                   rtol=0, atol=ATOL)
        # open_clip's own preprocessing (resize shorter side + centre crop) vs mlmm's (centre square + resize)
        z_oc = oc.encode_image(preprocess(pil)[None], normalize=True)
        z_mlmm = model.encode("image", image_to_tensor(pil, 32, train=False)[None])
        assert F.cosine_similarity(z_oc, z_mlmm).item() > 0.99
    # the same folder still loads in mlmm (config.json now also holds the text tower's transformers config)
    torch.testing.assert_close(from_pretrained(out).encode_text(TEXTS), model.encode_text(TEXTS), rtol=0, atol=0)


def test_open_clip_export_refuses_models_it_cannot_express(tok_dir, tmp_path):
    image_only = MultimodalModel(ModelConfig(embed_dim=16, image=ImageTowerConfig())).eval()
    with pytest.raises(NotOpenClipCompatible, match=r"have an image and a text tower; this model has \['image'\]"):
        export_open_clip(image_only, tmp_path / "a")
    distil = tiny_model(tok_dir, tmp_path, arch="distilbert")
    with pytest.raises(NotOpenClipCompatible, match="text tower arch 'distilbert'.*supports"):
        export_open_clip(distil, tmp_path / "b")
    assert not (tmp_path / "b").exists()  # nothing written


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_text_export(case, tok_dir, tmp_path):
    """AutoModel + AutoTokenizer + projection (M-CLIP style) reproduce mlmm's text embeddings."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    model = tiny_model(tok_dir, tmp_path, **CASES[case])
    folder = export_transformers_text(model, tmp_path / "text")
    encoder, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]  # every weight loads (pooler written as zeros)
    tok = AutoTokenizer.from_pretrained(str(folder))
    W = load_file(str(folder / "projection.safetensors"))["weight"]  # [E, D]
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (h * m).sum(1) / m.sum(1) if model.cfg.text.pooling == "mean" else h[:, 0]
    torch.testing.assert_close(F.normalize(pooled @ W.T, dim=-1), model.encode_text(TEXTS), rtol=0, atol=ATOL)
    # the documented module shipped in the folder does the same, without mlmm
    spec = importlib.util.spec_from_file_location("mlmm_text_encoder", folder / "mlmm_text_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    enc = module.MlmmTextEncoder.from_pretrained(folder)
    torch.testing.assert_close(enc.encode(TEXTS), model.encode_text(TEXTS), rtol=0, atol=ATOL)


def test_init_from_open_clip_checkpoint_file(tok_dir, tmp_path, caplog):
    """The usual distillation start: a CLIP checkpoint file (here tiny, native text transformer) -> image tower."""
    from mlmm.distill.teacher import TeacherConfig, build_teacher
    from transformers import AutoTokenizer

    from mlmm.distill.tiny import TINY_CLIP, write_tiny_open_clip
    from mlmm.training.finetune import load_init

    teacher_cfg = write_tiny_open_clip(tmp_path / "teacher")
    teacher = build_teacher(TeacherConfig(**teacher_cfg), cache=False)
    v = TINY_CLIP["vision_cfg"]
    image = ImageTowerConfig(image_size=v["image_size"], patch_size=v["patch_size"], width=v["width"],
                             layers=v["layers"], heads=v["width"] // v["head_width"])
    text = TextTowerConfig(tokenizer=str(tok_dir))
    model = MultimodalModel(ModelConfig(embed_dim=TINY_CLIP["embed_dim"], image=image, text=text),
                            AutoTokenizer.from_pretrained(str(tok_dir))).eval()
    text_before = model.encode_text(TEXTS)
    with caplog.at_level(logging.INFO, logger="mlmm"):
        kept = load_init(model, teacher_cfg["checkpoint"])  # = train.init_from: FILE
    assert "causal text transformer has no mlmm counterpart" in caplog.text
    assert kept and all(k.startswith(("towers.text.", "proj.text.")) for k in kept)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.encode("image", x), teacher.encode_image(x), rtol=0, atol=ATOL)
    torch.testing.assert_close(model.encode_text(TEXTS), text_before, rtol=0, atol=0)  # untouched
    wrong = MultimodalModel(ModelConfig(embed_dim=32, image=ImageTowerConfig(layers=1, heads=4))).eval()
    with pytest.raises(ValueError, match="model.image.heads=4 but the checkpoint has 2"):
        load_init(wrong, teacher_cfg["checkpoint"])
    small = MultimodalModel(ModelConfig(embed_dim=32, image=ImageTowerConfig(layers=1, width=16, heads=1))).eval()
    with pytest.raises(ValueError, match="model.image.width=16 but the checkpoint has 32"):
        load_init(small, teacher_cfg["checkpoint"])


def test_open_clip_round_trip_init_and_teacher(tok_dir, tmp_path):
    """mlmm -> open_clip folder -> (a) a fresh mlmm model initialised from it (train.init_from: local-dir:DIR),
    (b) an mlmm distillation teacher (kind open_clip, arch local-dir:DIR): same embeddings."""
    from mlmm.distill.teacher import TeacherConfig, build_teacher
    from mlmm.training.finetune import load_init

    model = tiny_model(tok_dir, tmp_path)
    folder = export_open_clip(model, tmp_path / "oc")  # a standalone open_clip folder (no mlmm export)
    fresh = tiny_model(tok_dir, tmp_path, seed=1)
    x = torch.randn(2, 3, 32, 32)
    assert (fresh.encode("image", x) - model.encode("image", x)).abs().max() > 1e-2
    assert load_init(fresh, f"local-dir:{folder}") == []
    torch.testing.assert_close(fresh.encode("image", x), model.encode("image", x), rtol=0, atol=ATOL)
    torch.testing.assert_close(fresh.encode_text(TEXTS), model.encode_text(TEXTS), rtol=0, atol=ATOL)
    teacher = build_teacher(TeacherConfig(kind="open_clip", arch=f"local-dir:{folder}"), cache=False)
    torch.testing.assert_close(teacher.encode_text(TEXTS), model.encode_text(TEXTS), rtol=0, atol=ATOL)
    torch.testing.assert_close(teacher.encode_image(x), model.encode("image", x), rtol=0, atol=ATOL)


def test_convert_cli(tok_dir, tmp_path, capsys):
    from mlmm.hub.convert import main

    export = save_pretrained(tiny_model(tok_dir, tmp_path), tmp_path / "export")
    assert main(["--checkpoint", str(export), "--to", "open_clip"]) == 0
    assert f"local-dir:{export.resolve()}" in capsys.readouterr().out
    assert (export / "open_clip_config.json").is_file() and (export / "open_clip_model.safetensors").is_file()
    assert main(["--checkpoint", str(export), "--to", "transformers"]) == 0
    assert (tmp_path / "text" / "mlmm_text_encoder.py").is_file()
    image_only = save_pretrained(MultimodalModel(ModelConfig(embed_dim=16, image=ImageTowerConfig())), tmp_path / "i")
    assert main(["--checkpoint", str(image_only), "--to", "open_clip"]) == 2
    assert "error: cannot export to open_clip" in capsys.readouterr().out
