"""Every fast path computes what the plain path computes (they are written for users' GPUs, tested here on CPU)."""
import pytest
import torch

from mlmm.config import build_config
from mlmm.data.batch import Batch
from mlmm.losses import ContrastiveLoss
from mlmm.models.model import MultimodalModel
from mlmm.training.engine import TrainModule, compile_towers


class Vocab:
    pad_token_id = 0

    def __len__(self):
        return 100


def tiny(seed=0, arch="bert", text_pooling="mean", image_pooling="cls"):
    cfg = build_config({
        "data": {"train_shards": "unused", "batch_size": 6},
        "model": {"embed_dim": 16, "image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2,
                                             "pooling": image_pooling},
                  "text": {"tokenizer": "unused", "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64,
                           "max_length": 16, "arch": arch, "pooling": text_pooling}},
        "loss": {"name": "contrastive", "pairs": [["image", "text"]]},
    })
    torch.manual_seed(seed)
    model = MultimodalModel(cfg.model, Vocab())
    return TrainModule(model, ContrastiveLoss(cfg.loss, model.modalities)).eval()  # eval: no dropout


def batch(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, 16), generator=g)
    att = torch.ones_like(ids)
    att[::2, 10:] = 0  # padded rows
    ids[att == 0] = 0
    ones = torch.ones(n, dtype=torch.bool)
    return Batch(keys=[f"k{i}" for i in range(n)], image=torch.randn(n, 3, 32, 32, generator=g), image_mask=ones,
                 text_ids=ids, text_attention=att, text_mask=ones)


def loss_and_grads(module, b):
    module.zero_grad()
    loss = module(b)["loss"]
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in module.named_parameters() if p.grad is not None}


def test_trimmed_text_padding_gives_the_same_loss_and_gradients():
    """The collate pads text to the batch's longest caption (rounded to 8), not to max_length: same result."""
    module, b = tiny(), batch()
    b.text_attention[:, 12:] = 0  # every row ends by position 12
    b.text_ids[:, 12:] = 0
    cut = Batch(**{**b.__dict__, "text_ids": b.text_ids[:, :12], "text_attention": b.text_attention[:, :12]})
    loss_full, grads_full = loss_and_grads(module, b)
    loss_cut, grads_cut = loss_and_grads(module, cut)
    torch.testing.assert_close(loss_cut, loss_full, atol=1e-5, rtol=1e-5)
    for k in grads_full:
        torch.testing.assert_close(grads_cut[k], grads_full[k], atol=1e-5, rtol=1e-4)


def test_packed_padding_and_first_token_blocks_compute_the_plain_transformer():
    """Transformer: packed padding gives the unpacked outputs at real tokens (0 at padding) and the same gradients;
    first_token_only gives token 0's output of the full stack; both together too."""
    from mlmm.models.layers import Transformer

    torch.manual_seed(0)
    net = Transformer(32, 3, 4)
    x = torch.randn(5, 9, 32, requires_grad=True)
    keep = torch.ones(5, 9, dtype=torch.bool)
    keep[1, 4:] = False
    keep[3, 1:] = False  # one real token
    keep[4, :] = False  # no real token at all: no NaN anywhere
    runs = {}
    for pack in (False, True):
        net.pack_padding = pack
        for first in (False, True):
            x.grad = None
            net.zero_grad()
            y = net(x, key_padding_mask=keep, first_token_only=first)
            real = y[keep.any(1), 0] if first else y[keep]  # a row without real tokens has no meaningful output
            (real.square().sum() + real.sum()).backward()
            runs[pack, first] = (real.detach(), x.grad.clone(), [p.grad.clone() for p in net.parameters()], y)
    assert runs[True, False][3].shape == (5, 9, 32) and runs[True, True][3].shape == (5, 1, 32)
    assert torch.equal(runs[True, False][3][~keep], torch.zeros_like(runs[True, False][3][~keep]))
    ref_first = runs[False, False][3][keep.any(1), 0].detach()
    for key, (out, gx, gp, _) in runs.items():
        assert torch.isfinite(out).all() and torch.isfinite(gx).all()
        if key[1]:
            torch.testing.assert_close(out, ref_first, atol=1e-5, rtol=1e-5)
        ref = runs[False, key[1]]
        torch.testing.assert_close(out, ref[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gx[keep], ref[1][keep], atol=1e-4, rtol=1e-4)
        for a, b in zip(gp, ref[2]):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    net.grad_checkpointing = True  # checkpointed blocks take the same paths
    net.train()
    y = net(x, key_padding_mask=keep, first_token_only=True)
    torch.testing.assert_close(y[keep.any(1), 0], ref_first, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:.*Profiler clears events")
@pytest.mark.parametrize("dtype,tokens,kernel", [(torch.bfloat16, 50, "_BF16Attention"), (torch.bfloat16, 129, "flash"),
                                                  (torch.float16, 50, "math"), (torch.float32, 50, "flash")])
def test_sdpa_takes_the_fast_path_for_short_bf16_cpu_attention(dtype, tokens, kernel):
    """mlmm.models.layers.sdpa on CPU: bf16 + <= 128 tokens -> _BF16Attention; fp16 + <= 128 -> the math kernel;
    else PyTorch's choice. Outputs and gradients (with a padding mask) equal PyTorch's default kernel's to rounding."""
    from torch.profiler import profile

    from mlmm.models.layers import sdpa

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, tokens, 16).to(dtype).requires_grad_() for _ in range(3))
    keep = torch.ones(2, 1, 1, tokens, dtype=torch.bool)
    keep[1, ..., tokens // 3:] = False
    g = torch.randn(2, 4, tokens, 16).to(dtype)
    with profile() as prof:
        out = sdpa(q, k, v, keep)
    ops = {e.key for e in prof.key_averages()}
    if kernel == "_BF16Attention":
        assert "_BF16Attention" in ops and not any("scaled_dot_product" in op for op in ops), ops
    else:
        assert any(kernel in op for op in ops if "scaled_dot_product" in op), ops
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, **tol)


def _math_kernel(q, k, v, keep):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):  # what mlmm.models.layers.sdpa ran for short bf16 CPU attention before
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("tq,tk,mask,peak", [(50, 50, None, 1.0), (77, 77, "padding", 1.0), (77, 77, "causal", 1.0),
                                             (1, 77, "padding", 1.0), (50, 50, "padding", 4.0)])
def test_bf16_attention_is_as_exact_as_the_math_kernel(tq, tk, mask, peak):
    """_BF16Attention (fp32 logits and softmax, bf16 matmuls with fp32 accumulation) against an fp64 reference on the
    fp32 inputs, beside PyTorch's math kernel (which runs everything in fp32) on the same bf16 inputs: outputs and
    q / k / v gradients within bf16 tolerance, and at most 1.25x the math kernel's error (measured here: 1.07-1.18x,
    and 0.99-1.01x with peaked attention; the excess is the probabilities rounded to bf16 for the p @ v matmul and
    the bf16 gradient matmuls, as in flash kernels). peak=4 scales q and k by 4
    (logits x16, peaked attention), where rounding the logits to bf16 would cost most."""
    from mlmm.models.layers import sdpa

    g = torch.Generator().manual_seed(0)
    q32, k32, v32 = (torch.randn(8, 4, t, 64, generator=g) * s for t, s in ((tq, peak), (tk, peak), (tk, 1.0)))
    grad32 = torch.randn(8, 4, tq, 64, generator=g)
    keep = None
    if mask == "padding":
        keep = torch.ones(8, 1, 1, tk, dtype=torch.bool)
        keep[::2, ..., tk // 3:] = False
    elif mask == "causal":
        keep = torch.ones(tq, tk, dtype=torch.bool).tril()
    x64 = [t.double().requires_grad_() for t in (q32, k32, v32)]
    ref = torch.nn.functional.scaled_dot_product_attention(*x64, attn_mask=keep)
    ref = [ref.detach(), *torch.autograd.grad(ref, x64, grad32.double())]

    def errors(fn):
        x = [t.bfloat16().requires_grad_() for t in (q32, k32, v32)]
        out = fn(*x, keep)
        got = [out.detach(), *torch.autograd.grad(out, x, grad32.bfloat16())]
        return [float((a.double() - b).norm() / b.norm()) for a, b in zip(got, ref)]  # out, dq, dk, dv

    fast, math = errors(sdpa), errors(_math_kernel)
    for name, e_fast, e_math in zip(("out", "dq", "dk", "dv"), fast, math):
        assert e_fast < 3e-2, (name, fast)
        assert e_fast <= 1.25 * e_math, (name, fast, math)


def test_bf16_attention_rows_with_nothing_to_attend_give_zeros_as_the_math_kernel():
    """A query row whose mask is all False: output 0 and no gradient through it (no NaN anywhere), as PyTorch's math
    kernel (the previous path) gives; the other rows are unchanged by it."""
    from mlmm.models.layers import sdpa

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=g).bfloat16().requires_grad_() for _ in range(3))
    grad = torch.randn(2, 2, 6, 16, generator=g).bfloat16()
    keep = torch.ones(2, 1, 6, 6, dtype=torch.bool).tril()
    keep[1, :, 2] = False  # batch 1, query 2 may attend nothing
    runs = []
    for fn in (sdpa, _math_kernel):
        out = fn(q, k, v, keep)
        runs.append([out, *torch.autograd.grad(out, (q, k, v), grad)])
    fast, math = runs
    assert fast[0].grad_fn.name() == "_BF16AttentionBackward"
    assert all(torch.isfinite(t).all() for t in fast)
    assert torch.equal(fast[0][1, :, 2], torch.zeros_like(fast[0][1, :, 2]))
    assert torch.equal(fast[1][1, :, 2], torch.zeros_like(fast[1][1, :, 2]))  # no gradient to the dead query
    for a, b in zip(fast, math):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_bf16_transformer_blocks_take_the_fast_attention(monkeypatch):
    """Every attention call of a bf16 Transformer on CPU (forward, packed padding, first-token-only last block) goes
    through _BF16Attention: PyTorch's SDPA is never called, so the fast path cannot silently fall away."""
    from mlmm.models import layers

    calls = []
    real = layers._BF16Attention.apply
    monkeypatch.setattr(layers._BF16Attention, "apply", lambda *a: calls.append(a[0].shape) or real(*a))

    def no_sdpa(*a, **kw):
        raise AssertionError("F.scaled_dot_product_attention called")

    monkeypatch.setattr(layers.F, "scaled_dot_product_attention", no_sdpa)
    torch.manual_seed(0)
    net = layers.Transformer(32, 3, 2).bfloat16()
    x = torch.randn(4, 9, 32).bfloat16().requires_grad_()
    keep = torch.ones(4, 9, dtype=torch.bool)
    keep[1, 5:] = False
    for mask in (None, keep):
        for first in (False, True):
            calls.clear()
            net(x, key_padding_mask=mask, first_token_only=first).float().sum().backward()
            assert len(calls) == 3 and calls[-1][-2] == (1 if first else 9), calls


@pytest.mark.parametrize("arch,text_pooling,image_pooling", [("clip", "mean", "cls"), ("clip", "cls", "mean"),
                                                              ("bert", "mean", "gpo")])
def test_pooled_only_towers_give_the_token_path_loss_and_gradients(arch, text_pooling, image_pooling):
    """The model's pooled-only path (packed text, CLS-only last block) = pool(forward_tokens) with nothing skipped."""
    fast, b = tiny(arch=arch, text_pooling=text_pooling, image_pooling=image_pooling), batch()
    plain = tiny(arch=arch, text_pooling=text_pooling, image_pooling=image_pooling)
    for tower in plain.model.towers.values():
        if hasattr(tower, "transformer"):
            tower.transformer.pack_padding = False
        tower.forward = lambda x, *a, _t=tower: _t.pool(_t.forward_tokens(x, *a), *a)  # the unskipped path
    for name, tower in fast.model.towers.items():  # each tower's forward is its pool(forward_tokens)
        x = (b.text_ids, b.text_attention) if name == "text" else (b.image,)
        with torch.no_grad():
            torch.testing.assert_close(tower(*x), plain.model.towers[name](*x), atol=1e-5, rtol=1e-5)
    loss_f, grads_f = loss_and_grads(fast, b)
    loss_p, grads_p = loss_and_grads(plain, b)
    torch.testing.assert_close(loss_f, loss_p, atol=1e-5, rtol=1e-5)
    assert set(grads_f) == set(grads_p)
    for k in grads_p:
        torch.testing.assert_close(grads_f[k], grads_p[k], atol=1e-5, rtol=1e-4)


def test_fused_adamw_matches_foreach():
    torch.manual_seed(0)
    params = [torch.randn(300, 40, requires_grad=True), torch.randn(40, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    opts = [torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1, fused=True),
            torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.1, foreach=True)]
    for step in range(5):
        for ps, opt in zip((params, twins), opts):
            g = torch.Generator().manual_seed(step)
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.slow  # compiling fwd + bwd of two towers takes ~1 min on 2 cores
def test_compiled_towers_match_eager():
    eager, compiled, b = tiny(), tiny(), batch()
    compile_towers(compiled.model)
    loss_e, grads_e = loss_and_grads(eager, b)
    loss_c, grads_c = loss_and_grads(compiled, b)
    torch.testing.assert_close(loss_c, loss_e, atol=1e-5, rtol=1e-5)
    for k in grads_e:
        torch.testing.assert_close(grads_c[k], grads_e[k], atol=1e-4, rtol=1e-3)
    assert set(dict(compiled.named_parameters())) == set(dict(eager.named_parameters()))  # names unchanged


@pytest.mark.slow  # as above
@pytest.mark.parametrize("arch", ["clip", "bert"])
def test_compiled_bf16_towers_track_fp32_as_eager_bf16_does(arch):
    """train.compile in bf16 (+4 % at 77 tokens in benchmarks/throughput.py, -2 % with real captions): its loss and
    gradients are as close to the fp32 path's as eager bf16's (measured: gradient cosine 0.99988 vs eager's 0.99942
    for bert); bf16 results are not bit-equal across kernels, so both are held to the fp32 reference."""
    ref, b = tiny(arch=arch), batch()
    eager, compiled = tiny(arch=arch).to(torch.bfloat16), tiny(arch=arch).to(torch.bfloat16)
    compile_towers(compiled.model)
    b16 = Batch(**{**b.__dict__, "image": b.image.to(torch.bfloat16)})
    loss32, grads32 = loss_and_grads(ref, b)
    flat32 = torch.cat([g.flatten() for g in grads32.values()])
    cos = {}
    for name, module in (("eager", eager), ("compiled", compiled)):
        loss, grads = loss_and_grads(module, b16)
        assert abs(float(loss) - float(loss32)) < 0.03 * float(loss32), name
        cos[name] = float(torch.nn.functional.cosine_similarity(
            flat32, torch.cat([grads[k].float().flatten() for k in grads32]), dim=0))
    assert cos["compiled"] > 0.98 and cos["compiled"] >= cos["eager"] - 1e-3, cos


def test_bf16_weights_track_the_fp32_path():
    """DeepSpeed's bf16 mode runs the model in bf16 (fp32 master weights in the optimizer): same loss to bf16
    precision."""
    fp32, b = tiny(), batch()
    bf16 = tiny().to(torch.bfloat16)
    b16 = Batch(**{**b.__dict__, "image": b.image.to(torch.bfloat16)})
    loss32, grads32 = loss_and_grads(fp32, b)
    loss16, grads16 = loss_and_grads(bf16, b16)
    assert abs(float(loss16) - float(loss32)) < 0.03 * float(loss32)
    cos = torch.nn.functional.cosine_similarity(
        torch.cat([g.flatten() for g in grads32.values()]), torch.cat([grads16[k].float().flatten() for k in grads32]),
        dim=0)
    assert cos > 0.98


def test_uint8_torch_resize_matches_pil_bicubic():
    """The loader resizes with torch's uint8 antialiased bicubic kernel instead of PIL: same filter, same crop box;
    on a photo-like (smooth) image the outputs agree to rounding, away from the crop border exactly as PIL."""
    import random

    import numpy as np
    from PIL import Image

    from mlmm.data.transforms import _normalise, crop_box, image_to_tensor, resize_uint8

    yy, xx = np.mgrid[0:300, 0:400].astype(np.float32)
    smooth = np.stack([128 + 100 * np.sin(xx / 23.0), 128 + 90 * np.cos(yy / 17.0), (xx + yy) % 256], -1)
    img = Image.fromarray(smooth.astype(np.uint8))
    for train in (False, True):
        box = crop_box(img.width, img.height, train, random.Random(3))
        ours = resize_uint8(np.array(img), box, 224).permute(1, 2, 0).numpy().astype(int)  # [224, 224, 3]
        pil = np.asarray(img.resize((224, 224), Image.Resampling.BICUBIC, box=box)).astype(int)
        diff = np.abs(ours - pil)
        assert diff[4:-4, 4:-4].max() <= 1 and diff.mean() < 0.5, (train, diff.max(), diff.mean())
        ref = _normalise(pil.astype(np.uint8))
        torch.testing.assert_close(image_to_tensor(img, 224, train, box=box), ref, atol=0.1, rtol=0)
    square = np.array(img)[:224, :224]
    assert torch.equal(resize_uint8(square, (0, 0, 224, 224), 224), torch.from_numpy(square).permute(2, 0, 1))


def test_normalize_on_device_gives_the_same_batches_and_training(tmp_path):
    """data.normalize_on_device: the loader yields uint8 images / frames / reference images, Batch.normalize_images
    makes them exactly the loader's float batches; a Trainer run with it trains to the same loss."""
    from pathlib import Path

    from conftest import build_tiny_data, tiny_clip_losses
    from mlmm.config import load_config
    from mlmm.data.preprocess import Preprocessor
    from mlmm.data.train_stream import build_train_loader
    from mlmm.training.trainer import load_tokenizer

    repo = Path(__file__).resolve().parents[1]
    data = build_tiny_data(tmp_path / "data", n_images=24, n_videos=8, n_audio=4, shard_size=40, seed=3)
    base = [f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
            f"train.ds_config={repo / 'ds_config.json'}", "train.progress=false", "train.max_steps=4",
            "train.log_every=2", "data.batch_size=8", "data.shuffle_buffer=0"]
    cfg = load_config(repo / "recipes" / "configs" / "tiny_clip.yaml", [*base, f"output_dir={tmp_path / 'a'}"])
    tok = load_tokenizer(cfg)
    batches = {}
    for u8 in (False, True):
        pre = Preprocessor(cfg.model, tok, train=False, uint8_images=u8)
        batches[u8] = next(iter(build_train_loader(cfg.data, pre, rank=0, world_size=1)))
    assert batches[True].image.dtype == torch.uint8 and batches[True].video.dtype == torch.uint8
    fixed = batches[True].normalize_images()
    torch.testing.assert_close(fixed.image, batches[False].image, rtol=0, atol=0)
    torch.testing.assert_close(fixed.video, batches[False].video, rtol=0, atol=0)
    losses = {u8: tiny_clip_losses([*base, f"data.normalize_on_device={str(u8).lower()}"], tmp_path / str(u8))
              for u8 in (False, True)}
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)


def test_zero0_single_replica_skips_the_identity_allreduce_with_identical_training(tmp_path):
    """One process, ZeRO-0: DeepSpeed's flatten + all-reduce + copy-back of every gradient is skipped; the weights
    after a few steps equal those of a run that keeps it."""
    from pathlib import Path

    from conftest import build_tiny_data
    from mlmm.config import load_config
    from mlmm.training import Trainer, engine as engine_mod

    repo = Path(__file__).resolve().parents[1]
    data = build_tiny_data(tmp_path / "data", n_images=24, n_videos=8, n_audio=8, shard_size=40, seed=4)
    states = {}
    for skip in (True, False):
        cfg = load_config(repo / "recipes" / "configs" / "tiny_clip.yaml", [
            f"data.train_shards={data / 'shards'}", f"model.text.tokenizer={data / 'tok'}",
            f"output_dir={tmp_path / str(skip)}", f"train.ds_config={repo / 'ds_config.json'}", "train.progress=false",
            "train.max_steps=3", "data.batch_size=8", "train.zero_stage=0"])
        trainer = Trainer(cfg).setup()
        assert "allreduce_gradients" in vars(trainer.engine)  # initialize() replaced it on this engine
        if not skip:  # the reference run keeps DeepSpeed's own all-reduce
            del trainer.engine.allreduce_gradients
        trainer.train()
        states[skip] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
        trainer.cleanup()
    for k, v in states[True].items():
        torch.testing.assert_close(v, states[False][k], rtol=0, atol=0)
    assert engine_mod.skip_single_replica_allreduce.__doc__


@pytest.mark.parametrize("grad_clip", [0.0, 1e-3])
def test_fused_bf16_step_is_deepspeeds_step_bit_for_bit(grad_clip):
    """bf16 at ZeRO-0: mlmm's fused optimizer step (each gradient converted and read once) gives DeepSpeed's own step
    exactly: the same norm, bf16 weights, fp32 master weights and AdamW moments, with and without clipping, and the
    same skip of an update with a NaN gradient."""
    from mlmm.training import distributed
    from mlmm.training.engine import initialize

    distributed.init_distributed()
    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    cfg = build_config({
        "data": {"train_shards": "unused", "batch_size": 6},
        "model": {"embed_dim": 16, "image": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "heads": 2},
                  "text": {"tokenizer": "unused", "hidden": 32, "layers": 2, "heads": 2, "intermediate": 64,
                           "max_length": 16, "arch": "clip"}},
        "loss": {"name": "contrastive", "pairs": [["image", "text"]]},
        "train": {"precision": "bf16", "zero_stage": 0, "grad_clip": grad_clip, "warmup_steps": 0, "max_steps": 100,
                  "ds_config": str(repo / "ds_config.json")}})
    runs = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = MultimodalModel(cfg.model, Vocab())
        engine, _ = initialize(cfg, TrainModule(model, ContrastiveLoss(cfg.loss, model.modalities)),
                               torch.device("cpu"))
        opt = engine.optimizer
        assert ("step" in vars(opt)) is True  # installed by initialize
        if not fused:
            del opt.step  # DeepSpeed's own FP16_UnfusedOptimizer.step
        log = []
        for i in range(4):
            b = batch(seed=i)
            b = Batch(**{**b.__dict__, "image": b.image.to(torch.bfloat16)})
            engine.backward(engine(b)["loss"])
            if i == 2:  # one NaN gradient: the update is skipped
                next(p for p in engine.module.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
            engine.step()
            log.append((engine.was_step_applied(), opt._global_grad_norm))
        runs[fused] = log, [p.detach().clone() for p in engine.module.parameters()], \
            [p.detach().clone() for g in opt.fp32_groups for p in g], \
            [s["exp_avg_sq"].clone() for s in opt.optimizer.state.values()]
    assert runs[True][0] == runs[False][0] and [a for a, _ in runs[True][0]] == [True, True, False, True]
    assert grad_clip == 0 or runs[True][0][0][1] > grad_clip  # the clipping path (scale != 1) is exercised
    for got, ref in zip(runs[True][1:], runs[False][1:]):
        assert len(got) == len(ref) > 0
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
