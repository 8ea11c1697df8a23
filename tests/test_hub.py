import pytest
import torch

from mlmm.config import ImageTowerConfig, ModelConfig, TextTowerConfig
from mlmm.hub import from_pretrained, save_pretrained
from mlmm.models.model import MultimodalModel


def image_model():
    torch.manual_seed(0)
    return MultimodalModel(ModelConfig(embed_dim=16, image=ImageTowerConfig()))


def test_round_trip_identical_embeddings(tmp_path):
    model = image_model().eval()
    out = save_pretrained(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(from_pretrained(out).encode("image", x), model.encode("image", x), rtol=0, atol=0)


def test_truncated_weights_give_a_clear_error(tmp_path):
    out = save_pretrained(image_model(), tmp_path / "export")
    weights = out / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ValueError, match="unreadable safetensors file"):
        from_pretrained(out)


def test_not_an_export(tmp_path):
    with pytest.raises(FileNotFoundError, match="not an mlmm export"):
        from_pretrained(tmp_path)


def test_export_of_a_pretrained_text_tower_reloads(tmp_path):
    """A text tower started from a HF folder (e.g. a distilled MiniLM student) reloads from the export alone."""
    from transformers import BertConfig, BertModel

    from mlmm.data.tokenization import train_tokenizer

    tok = train_tokenizer(["a red circle", "ein roter Kreis", "un cercle rouge"] * 5, tmp_path / "tok", vocab_size=60)
    hf = BertModel(BertConfig(vocab_size=len(tok), hidden_size=24, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=48, max_position_embeddings=40))
    hf.save_pretrained(tmp_path / "hf")
    cfg = ModelConfig(embed_dim=16, text=TextTowerConfig(tokenizer=str(tmp_path / "tok"), pretrained=str(tmp_path / "hf")))
    model = MultimodalModel(cfg, tok).eval()
    out = save_pretrained(model, tmp_path / "export")
    import shutil

    shutil.rmtree(tmp_path / "hf")  # the export must not need the original folder
    texts = ["a red circle", "un cercle rouge"]
    torch.testing.assert_close(from_pretrained(out).encode_text(texts), model.encode_text(texts), rtol=0, atol=0)
