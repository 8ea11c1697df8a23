"""Head <-> loss contracts (mlmm.contracts), in the style of transformers' model test mixins: every registered loss
has a tester (its tiny recipe + overrides, so every registered head is built by one of them), and the same checks run
on each: it builds from its tiny config; each head writes exactly the keys it declares and runs on the keys it
declares it reads; the loss runs on the keys it declares; every trainable parameter gets a gradient; the
state_dicts round-trip. A loss without the head it needs fails when the config loads, in one line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mlmm.config import ConfigError, load_config
from mlmm.contracts import head_writes, token_keys
from mlmm.data.batch import Batch
from mlmm.models.model import MultimodalModel
from mlmm.registry import HEADS, LOSSES

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "recipes" / "configs"
TEACHER = "loss.teacher={kind: open_clip, model_config: TEACHER, random_init: true, language: en}"
# loss -> (tiny recipe, overrides); the heads of these recipes cover every registered head
# the cmmae head encodes the visible patches with the towers' patch encoders, without the video tower's temporal
# transformer, either tower's final norm or the projections (its recipe trains those with the contrastive term)
UNUSED = {"cmmae": ("towers.video.transformer.", "towers.video.ln_post.", "proj.")}
TESTERS = {
    "contrastive": ("tiny_clip.yaml", []),
    "multi": ("tiny_cmmae.yaml", []),
    "cmmae": ("tiny_cmmae.yaml", ["loss={name: cmmae}", "model.image=null", "model.text=null",
                                  "model.video.share_image_tower=false",
                                  "model.video.frame_encoder={image_size: 32, patch_size: 8, width: 32, layers: 1}"]),
    "divtr": ("tiny_divtr.yaml", []),
    "ascl": ("tiny_ascl.yaml", []),
    "vse": ("tiny_vse.yaml", []),
    "vse_triplet": ("tiny_clip.yaml", ["loss={name: vse_triplet, pairs: [[image, text]]}"]),
    "mvsen": ("tiny_mvsen.yaml", []),
    "rcar": ("tiny_rcar.yaml", []),
    "composed": ("tiny_cir.yaml", []),
    "hashing": ("tiny_hashing.yaml", ["loss={name: hashing, pairs: [[image, text]], similarity: labels}",
                                      "model.heads.hash.source=tokens"]),
    "vqa": ("tiny_vqa.yaml", ["model.heads.vqa.answers=[red, blue, two, green]"]),
    "caption": ("tiny_caption.yaml", ["loss={name: caption}"]),
    "mclip": ("tiny_distill_text.yaml", ["loss.use_stored=false", TEACHER]),
    "mla": ("tiny_mla_stage2.yaml", ["loss.allow_no_init=true", "loss.use_stored=false", TEACHER,
                                     "model.image={image_size: 32, patch_size: 8, width: 32, layers: 1}"]),
    "clip4vla": ("tiny_distill_audio.yaml", ["loss.use_stored=false", TEACHER, "model.image={image_size: 32, "
                                             "patch_size: 8, width: 32, layers: 1}", "model.text={tokenizer: TOK, "
                                             "hidden: 32, layers: 1, heads: 2, intermediate: 64}"]),
    "logit_kd": ("tiny_clip.yaml", ["loss={name: logit_kd, use_stored: false}", TEACHER]),
}
CAPTIONS = [("a big red circle", "ein großer roter Kreis"), ("a small blue square", "ein kleines blaues Quadrat"),
            ("a green triangle", "ein grünes Dreieck"), ("two red squares", "zwei rote Quadrate")]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """A BPE tokenizer for the captions, and beside it a tiny random open_clip teacher config."""
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.distill.tiny import write_tiny_open_clip

    out = tmp_path_factory.mktemp("tok")
    train_tokenizer([c for pair in CAPTIONS for c in pair] * 4, out, vocab_size=200)
    write_tiny_open_clip(out / "teacher")
    return out


def config_of(loss: str, tok_dir: Path, tmp_path: Path, extra=()):
    recipe, overrides = TESTERS[loss]
    overrides = [o.replace("TOK", str(tok_dir)).replace("TEACHER", str(tok_dir / "teacher" / "tiny-clip.json"))
                 for o in overrides]
    return load_config(CONFIGS / recipe, [f"model.text.tokenizer={tok_dir}", f"output_dir={tmp_path}",
                                          *overrides, *extra] if "model.text=null" not in overrides else
                       [f"output_dir={tmp_path}", *overrides, *extra])


def tiny_batch(cfg, tokenizer, B: int = 6) -> Batch:
    """Every tower's input for B rows: rows 0 and 3 are one sample (en / de), row 5 has no media, row 4 no caption."""
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    keys = ["s0", "s1", "s2", "s0", "s3", "s4"][:B]
    langs = ["en", "de", "en", "de", "en", "de"][:B]
    pairs = [CAPTIONS[i % len(CAPTIONS)] for i in (0, 1, 2, 0, 3, 1)][:B]
    captions = [p[0] if lang == "en" else p[1] for p, lang in zip(pairs, langs)]
    meta = [{"captions": {"en": [p[0]], "de": [p[1]]}, "labels": p[0].split()[-2:], "class": i % 3,
             "answers": {"en": ["red"] * 7 + ["blue"] * 3, "de": ["red"] * 10}} for i, p in enumerate(pairs)]
    has_media = torch.tensor([True] * (B - 1) + [False])
    has_text = torch.tensor([i != 4 for i in range(B)])
    batch = Batch(keys=keys, lang=[lang if has_text[i] else "" for i, lang in enumerate(langs)],
                  captions=[c if has_text[i] else "" for i, c in enumerate(captions)], meta=meta)
    if m.image is not None:
        s = m.image.image_size
        batch.image, batch.image_mask = torch.randn(B, 3, s, s, generator=g), has_media.clone()
        batch.extras = {"ref": torch.randn(B, 3, s, s, generator=g), "ref_mask": torch.tensor([True] * B)}
    if m.video is not None:
        s = (m.video.frame_encoder or m.image).image_size
        batch.video = torch.randn(B, m.video.frames, 3, s, s, generator=g)
        batch.video_mask = has_media.clone()
    if m.audio is not None:
        batch.audio = torch.randn(B, 1, m.audio.n_mels, m.audio.frames, generator=g)
        batch.audio_mask = has_media.clone()
    if m.text is not None:
        enc = tokenizer(batch.captions, padding="max_length", truncation=True, max_length=16, return_tensors="pt")
        batch.text_ids, batch.text_attention, batch.text_mask = enc["input_ids"], enc["attention_mask"], has_text
    return batch


def build(cfg, seed: int = 0):
    from mlmm.data.tokenization import load_tokenizer

    tok = load_tokenizer(cfg.model.text.tokenizer) if cfg.model.text is not None else None
    torch.manual_seed(seed)
    model = MultimodalModel(cfg.model, tok)
    loss = LOSSES.get(cfg.loss.name).cls(cfg.loss, model.modalities)
    return model, loss, tok


def restricted(outputs: dict, keys: set) -> dict:
    return {k: v for k, v in outputs.items() if k in keys}


def mlmm_names(registry) -> list[str]:
    """The names mlmm registers (other test modules register their own probes at import)."""
    return [n for n in registry.names() if registry.get(n).cls.__module__.startswith("mlmm.")]


def test_every_registered_head_and_loss_has_a_tester(tok_dir, tmp_path):
    assert sorted(TESTERS) == mlmm_names(LOSSES)
    heads = {h.name for loss in TESTERS for h in config_of(loss, tok_dir, tmp_path).model.heads.values()}
    assert sorted(heads) == mlmm_names(HEADS)


@pytest.mark.parametrize("loss_name", sorted(TESTERS))
def test_contract(loss_name, tok_dir, tmp_path):
    cfg = config_of(loss_name, tok_dir, tmp_path)
    model, loss, tok = build(cfg)
    model.train()
    batch = tiny_batch(cfg, tok)
    # every head sees only the keys it declares to read, and writes exactly the keys it declares
    seen = {}
    for inst, head in model.heads.items():
        hcfg = cfg.model.heads[inst]
        reads = HEADS.get(hcfg.name).cls.reads(hcfg, cfg.model)
        head.register_forward_pre_hook(lambda mod, args, reads=reads: (restricted(args[0], reads), *args[1:]))
        head.register_forward_hook(lambda mod, args, out, inst=inst: seen.__setitem__(inst, set(out)))
    torch.manual_seed(1)
    outputs = model(batch)
    for inst, hcfg in cfg.model.heads.items():
        assert seen[inst] == head_writes(hcfg, cfg.model), inst
    # the loss runs on the keys it declares to read, and every trainable parameter gets a gradient
    reads = LOSSES.get(cfg.loss.name).cls.reads(cfg.loss, cfg.model)
    result = loss(restricted(outputs, reads), batch)
    assert torch.isfinite(result["loss"])
    result["loss"].backward()
    # every trainable parameter of the heads, the loss, and the towers (+ projections) whose outputs are read
    reads |= {k for h in cfg.model.heads.values() for k in HEADS.get(h.name).cls.reads(h, cfg.model)}
    used = [f"towers.{m}." for m in model.modalities if reads & {m, *token_keys(m)}]
    used += ["heads."] + [f"proj.{m}." for m in model.modalities if m in reads]
    params = [*model.named_parameters(), *(("loss." + n, p) for n, p in loss.named_parameters())]
    no_grad = [n for n, p in params if p.requires_grad and p.grad is None and n.startswith((*used, "loss."))
               and not n.startswith(UNUSED.get(loss_name, ()))]
    assert not no_grad, f"{loss_name}: trainable parameters without a gradient: {no_grad[:8]}"
    # the state_dicts round-trip into a model and loss built with another seed: same outputs, same loss
    again, again_loss, _ = build(cfg, seed=1)
    again.load_state_dict(model.state_dict())
    again_loss.load_state_dict(loss.state_dict())
    for m in (model, again, loss, again_loss):
        m.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        ref = model(batch)
        torch.manual_seed(2)
        out = again(batch)
    assert ref.keys() == out.keys()
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=0, msg=k)


# the losses that read a head's outputs (mla reads the text embedding, which its language adapters only rewrite)
HEAD_LOSSES = [n for n in sorted(TESTERS) if n not in ("contrastive", "vse_triplet", "rcar", "mclip", "mla",
                                                         "clip4vla", "logit_kd")]


@pytest.mark.parametrize("loss_name", HEAD_LOSSES)
def test_a_loss_without_its_head_fails_at_load_in_one_line(loss_name, tok_dir, tmp_path):
    with pytest.raises(ConfigError) as e:
        config_of(loss_name, tok_dir, tmp_path, extra=["model.heads={}"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(str(CONFIGS / TESTERS[loss_name][0]))
    assert " reads " in msg and "no tower or head of the model writes; add a " in msg, msg


def test_the_error_names_the_head_to_add_and_a_clash_of_two_heads(tok_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"tiny_divtr\.yaml: loss: the divtr loss reads divtr_m2t_logits, which no "
                                          r"tower or head of the model writes; add a divtr head"):
        config_of("divtr", tok_dir, tmp_path, extra=["model.heads={}"])
    twice = json.dumps({"a": {"name": "divtr", "media": "video"}, "b": {"name": "divtr", "media": "video"}})
    with pytest.raises(ConfigError, match=r"model\.heads\.b: the divtr head writes divtr_m2t_logits, which "
                                          r"model\.heads\.a already writes"):
        config_of("divtr", tok_dir, tmp_path, extra=[f"model.heads={twice}"])
    with pytest.raises(ConfigError, match=r"model\.heads\.divtr: the divtr head reads audio, which only an audio tower "
                                          r"provides; add model\.audio"):
        config_of("divtr", tok_dir, tmp_path, extra=["model.heads.divtr.media=audio"])


def test_a_class_without_its_declarations_is_refused_at_registration():
    from torch import nn

    class NoContract(nn.Module):
        def forward(self, outputs, batch, model):
            return {}

    with pytest.raises(TypeError, match=r"head 'no_contract' \(NoContract\) does not declare reads, writes"):
        HEADS.register("no_contract")(NoContract)
    with pytest.raises(TypeError, match=r"loss 'no_contract' \(NoContract\) does not declare reads"):
        LOSSES.register("no_contract")(NoContract)
