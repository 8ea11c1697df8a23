"""train.gradient_checkpointing: every tower recomputes its activations in backward (HF encoders through their own
switch, mlmm's ViT / audio / video / native text blocks through torch.utils.checkpoint), with the same loss and the
same gradients as the plain path, and fewer activation bytes kept for backward."""
import pytest
import torch

from mlmm.config import build_config
from mlmm.models.model import MultimodalModel

IMAGE = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}
AUDIO = {"seconds": 0.5, "n_mels": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2}


def build(text_arch: str, shared_video: bool, image_pooling: str, tokenizer):
    video = {"frames": 4, "temporal_layers": 1, "heads": 2, "share_image_tower": shared_video}
    if not shared_video:
        video["frame_encoder"] = dict(IMAGE)
    text = {"tokenizer": "unused", "arch": text_arch, "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64,
            "max_length": 16}
    cfg = build_config({"model": {"embed_dim": 16, "image": {**IMAGE, "pooling": image_pooling}, "video": video,
                                  "audio": AUDIO, "text": text}})
    torch.manual_seed(0)
    return MultimodalModel(cfg.model, tokenizer).train()  # train(): dropout on in the HF towers


class Tok:  # what the towers read from a tokenizer
    pad_token_id = 1

    def __len__(self):
        return 50


def inputs(model):
    g = torch.Generator().manual_seed(1)
    frames = model.towers["audio"].cfg.frames
    ids = torch.randint(5, 50, (4, 12), generator=g)
    att = torch.ones_like(ids)
    att[1, 7:] = 0  # padding: the packed path of the native tower, the mask path of the HF ones
    att[3, 4:] = 0
    ids[att == 0] = 1
    return {"image": (torch.randn(4, 3, 32, 32, generator=g), None),
            "video": (torch.randn(4, 4, 3, 32, 32, generator=g), None),
            "audio": (torch.randn(4, 1, 32, frames, generator=g), None),
            "text": (ids, att)}


def run(model, x, modality):
    """loss, {param: grad} and the bytes autograd kept for backward, for one modality's embedding."""
    kept = [0]

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same dropout masks in both runs (checkpoint replays the RNG state)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        z = model.encode(modality, *x)  # [B, E]
    w = torch.linspace(-1, 1, z.numel()).view_as(z)
    loss = (z * w).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, kept[0]


@pytest.mark.parametrize("text_arch,shared_video,image_pooling", [("bert", True, "cls"), ("xlm-roberta", False, "mean"),
                                                                 ("clip", True, "mean")])
def test_every_tower_checkpoints_with_equal_loss_and_gradients(text_arch, shared_video, image_pooling):
    model = build(text_arch, shared_video, image_pooling, Tok())
    x = inputs(model)
    plain = {m: run(model, x[m], m) for m in x}
    model.set_grad_checkpointing(True)
    text = model.towers["text"]
    assert any(getattr(mod, "gradient_checkpointing", False) for mod in text.model.modules()) \
        if text_arch != "clip" else text.transformer.grad_checkpointing
    for m in x:
        loss, grads, kept = run(model, x[m], m)
        ref_loss, ref_grads, ref_kept = plain[m]
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0, msg=m)
        assert grads.keys() == ref_grads.keys(), m
        for n, g in grads.items():
            torch.testing.assert_close(g, ref_grads[n], rtol=1e-6, atol=1e-7, msg=f"{m}: {n}")
        assert kept < 0.8 * ref_kept, (m, kept, ref_kept)  # activations of the blocks were not kept
    model.set_grad_checkpointing(False)
    assert plain["image"][2] == run(model, x["image"], "image")[2]
