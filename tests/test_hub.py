import pytest
import torch

from mlmm.config import ImageTowerConfig, ModelConfig
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
