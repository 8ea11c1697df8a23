import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from mlmm.data.batch import Batch
from mlmm.losses.contrastive import ContrastiveLoss, ContrastiveLossConfig, info_nce, masked_info_nce


def reference_clip_loss(a, b, scale):
    """Hand-written CLIP loss: mean over rows of -log softmax of the matching column, both ways."""
    n = a.shape[0]
    sim = scale * a @ b.t()
    total = 0.0
    for i in range(n):
        row = sim[i]
        col = sim[:, i]
        total += -(row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return total / (2 * n)


def normed(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_info_nce_matches_reference():
    a, b = normed(6, 8, seed=1), normed(6, 8, seed=2)
    scale = torch.tensor(10.0)
    torch.testing.assert_close(info_nce(a, b, scale), reference_clip_loss(a, b, scale))


def test_masked_info_nce_uses_only_rows_with_both_modalities():
    a, b = normed(6, 8, seed=3), normed(6, 8, seed=4)
    valid = torch.tensor([True, False, True, True, False, True])
    scale = torch.tensor(5.0)
    expected = reference_clip_loss(a[valid], b[valid], scale)
    torch.testing.assert_close(masked_info_nce(a, b, valid, scale), expected)


def test_masked_info_nce_with_too_few_rows_is_zero_with_grad():
    a = normed(3, 4).requires_grad_()
    b = normed(3, 4, seed=1).requires_grad_()
    loss = masked_info_nce(a, b, torch.tensor([True, False, False]), torch.tensor(1.0))
    loss.backward()
    assert loss.item() == 0.0 and a.grad is not None and torch.all(a.grad == 0)


def test_contrastive_loss_terms_per_pair_and_total():
    cfg = ContrastiveLossConfig(pairs=[["image", "text"], ["audio", "text"], ["video", "text"]],
                                weights={"audio_text": 0.5})
    loss = ContrastiveLoss(cfg, ["image", "audio", "text"])  # no video tower: that pair is dropped
    assert loss.pairs == [("image", "text"), ("audio", "text")]
    B = 6
    out = {"image": normed(B, 8, seed=5), "audio": normed(B, 8, seed=6), "text": normed(B, 8, seed=7)}
    batch = Batch(keys=[str(i) for i in range(B)],
                  image_mask=torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool),
                  audio_mask=torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.bool),
                  text_mask=torch.ones(B, dtype=torch.bool))
    res = loss(out, batch)
    scale = torch.tensor(math.exp(cfg.init_logit_scale))
    it = reference_clip_loss(out["image"][:3], out["text"][:3], scale)
    at = reference_clip_loss(out["audio"][3:], out["text"][3:], scale)
    torch.testing.assert_close(res["image_text_loss"], it)
    torch.testing.assert_close(res["audio_text_loss"], at)
    torch.testing.assert_close(res["loss"], it + 0.5 * at)
    res["loss"].backward()
    assert loss.logit_scale["image_text"].grad is not None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, a, b, valid, scale, out_q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    B = a.shape[0] // world
    sl = slice(rank * B, (rank + 1) * B)
    a_loc = a[sl].clone().requires_grad_()
    b_loc = b[sl].clone().requires_grad_()
    loss = masked_info_nce(a_loc, b_loc, valid[sl], scale)
    loss.backward()
    out_q.put((rank, loss.item(), a_loc.grad.numpy().copy(), b_loc.grad.numpy().copy()))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("valid", [[1, 1, 0, 1, 1, 1, 1, 0], [0, 1, 0, 0, 1, 1, 1, 1]], ids=["3+3", "1+4"])
def test_two_rank_gather_with_grad_matches_single_process(valid):
    """local_loss on 2 ranks: average of rank losses and the sum of rank gradients equal the global loss's, also
    when the ranks hold different numbers of valid rows (each rank returns its share of the global mean)."""
    world, B = 2, 4
    a, b = normed(world * B, 8, seed=8), normed(world * B, 8, seed=9)
    valid = torch.tensor(valid, dtype=torch.bool)
    scale = torch.tensor(7.0)
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, a, b, valid, scale, q)) for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(q.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    ag, bg = a.clone().requires_grad_(), b.clone().requires_grad_()
    ref = reference_clip_loss(ag[valid], bg[valid], scale)
    ref.backward()
    torch.testing.assert_close(torch.tensor(sum(r[1] for r in results) / world), ref.detach())
    # DeepSpeed averages gradients over ranks; all_gather's backward sums them: together, the reference
    grad_a = torch.cat([torch.from_numpy(r[2]) for r in results]) / world
    grad_b = torch.cat([torch.from_numpy(r[3]) for r in results]) / world
    torch.testing.assert_close(grad_a, ag.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_b, bg.grad, atol=1e-6, rtol=1e-5)


def test_rows_of_the_same_sample_are_not_negatives():
    """all_languages puts a sample in the batch once per language: its copies must not be negatives."""
    a, b = normed(4, 8, seed=10), normed(4, 8, seed=11)
    a = torch.cat([a, a[:1]])  # row 4 = sample 0 again (another language's caption in b[4])
    b = torch.cat([b, normed(1, 8, seed=12)])
    groups = torch.tensor([0, 1, 2, 3, 0])
    scale = torch.tensor(5.0)
    got = masked_info_nce(a, b, torch.ones(5, dtype=torch.bool), scale, groups)
    sim = scale * a @ b.t()
    total = 0.0
    for i in range(5):
        allowed = [j for j in range(5) if j == i or groups[j] != groups[i]]
        total += -(sim[i, i] - torch.logsumexp(sim[i, allowed], 0))
        total += -(sim[i, i] - torch.logsumexp(sim[allowed, i], 0))
    torch.testing.assert_close(got, total / 10)


def test_bf16_embeddings_give_fp32_logits_and_loss():
    """Under bf16 the similarities, the scale and the cross-entropy are computed in fp32 (as open_clip under
    autocast): the loss of bf16 embeddings equals the fp64 loss of the same (bf16-rounded) values."""
    a, b = normed(16, 32, seed=20).bfloat16(), normed(16, 32, seed=21).bfloat16()
    scale = torch.tensor(100.0)  # logits up to 100: bf16 steps of 0.5 there
    got = masked_info_nce(a, b, torch.ones(16, dtype=torch.bool), scale)
    assert got.dtype == torch.float32
    want = reference_clip_loss(a.double(), b.double(), scale.double())
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, want.item())


def _bf16_cases():
    """(name, fn(*tensors), tensors): every score-matrix term of the method losses, on bf16 inputs."""
    from mlmm.losses.asymmetry import drop_term, fused_infonce, negative_edit_term
    from mlmm.losses.divtr import interaction_ce
    from mlmm.losses.mvsen import multilabel_bce, text_text_infonce
    from mlmm.losses.vse import triplet_loss

    g = torch.Generator().manual_seed(3)
    S = torch.rand(8, 8, generator=g) * 2 - 1  # cosine scores [n, n]
    e, n2 = torch.rand(8, generator=g) * 2 - 1, torch.rand(8, generator=g) * 2 - 1  # [n]
    valid, excl = torch.ones(8, dtype=torch.bool), torch.zeros(8, 8, dtype=torch.bool)
    scale = torch.tensor(100.0)  # logits up to 100: a bf16 step is 0.5 there
    t, y = normed(8, 16, seed=4), normed(8, 16, seed=5)
    return [
        ("fused_infonce", lambda S: fused_infonce(S, scale, excl), (S,)),
        ("negative_edit_term", lambda S, e: negative_edit_term(S, e, valid, scale, excl, 0.1), (S, e)),
        ("drop_term", lambda S, e, n2: drop_term(S, e, valid, scale, [(n2, valid, 0.1)], 0.1), (S, e, n2)),
        ("text_text_infonce", lambda t, y: text_text_infonce(t, y, scale, excl), (t, y)),
        ("interaction_ce", interaction_ce, (100 * S,)),  # logits [n, 1 + k]
        ("multilabel_bce", lambda z: multilabel_bce(z, (z > 0).float(), valid), (10 * S,)),
        ("triplet_loss", lambda S: triplet_loss(S, 0.2, True), (S,)),
    ]


@pytest.mark.parametrize("case", range(7))
def test_every_method_term_computes_bf16_scores_in_fp32(case):
    """A bf16 run's method losses (ASCL, MVSEN, VSE, DI-vTR) take their logits and cross-entropies in fp32, as
    the contrastive loss does: the loss of bf16 inputs equals the fp64 loss of the same (bf16-rounded) values."""
    name, fn, tensors = _bf16_cases()[case]
    rounded = [x.bfloat16() for x in tensors]
    got = fn(*rounded)
    assert got.dtype == torch.float32, name
    want = fn(*[x.double() for x in rounded])
    assert abs(got.item() - want.item()) < 1e-5 * max(1.0, abs(want.item())), name


def test_a_bf16_temperature_parameter_gives_an_fp32_scale():
    from mlmm.losses.contrastive import temperature

    p = torch.full((1,), math.log(1 / 0.07)).bfloat16()  # what DeepSpeed's bf16 mode holds
    got = temperature(p, math.log(100.0))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(math.exp(float(p.float())), rel=1e-6)
    assert temperature(torch.full((1,), 9.0).bfloat16(), math.log(100.0)).item() == pytest.approx(100.0, rel=1e-6)
