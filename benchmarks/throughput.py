"""Training-step throughput: mlmm's image–text contrastive step vs open_clip's, same shapes, one process.

    python -m benchmarks.throughput                                   # CPU: ViT-B/32 shape, batch 16, fp32 + bf16
    python -m benchmarks.throughput --text captions --reps 5 --max-load 1.5   # CPU figures, on a quiet box only
    python -m benchmarks.throughput --shape s32 --steps 3 --reps 2    # quick look (narrow towers)
    python -m benchmarks.throughput --batch 256 1024 --precision bf16 # CUDA (H100 anchor: open_clip 4241/s at 1024)

Both sides build the same towers from scratch (random init, random data):
  * open_clip: ``open_clip.model.CLIP`` (ViT image tower, causal 12-layer text transformer), ``ClipLoss``,
    ``torch.optim.AdamW`` with open_clip's parameter groups, ``torch.autocast`` for bf16 — its training loop.
  * mlmm: ``MultimodalModel`` (ViT image tower, bidirectional BERT-style text tower of the same width/depth),
    the registered ``contrastive`` loss, through mlmm's real DeepSpeed engine (``mlmm.training.engine``): ZeRO
    flat fp32 buffers, and for bf16 DeepSpeed's bf16 mode (bf16 weights, fp32 master weights in the optimizer).
  * mlmm's real step (unless ``--no-trainer``): a ``Trainer`` over generated JPEG + caption shards times
    ``Trainer.run_step`` (the loader with ``--trainer-workers`` workers, the language / bad-data checks, the NaN
    guard, logging every ``--trainer-log-every`` updates) and, on the same trainer, its engine calls alone; both are
    reported (``runs[].trainer``), the open_clip ratio stays engine against engine.
Warm-up steps are excluded; the frameworks alternate over ``--reps`` repetitions and the median step time counts.
FLOPs per step come from ``FlopCounterMode`` (forward + backward), MFU is against a large matmul of the same
precision timed in the same run, peak memory is CUDA's max allocated (or, on CPU, the peak RSS of a child process
running only that framework). Writes ``benchmarks/results/throughput_<device>.json``.

On CPU the script re-runs itself with glibc's malloc told to keep freed memory (``MALLOC_MMAP_THRESHOLD_`` /
``MALLOC_TRIM_THRESHOLD_``, the same for both frameworks; ``--default-malloc`` opts out). With glibc's defaults each
B/32 step page-faults ~150k fresh pages, and two models in one process disturb each other's heap: mlmm's bf16
step measured 2.4-2.5 s alone and 2.8-3.7 s once open_clip had run in the same process. With these settings it
takes 2.5-2.6 s alone and 2.5-2.7 s after open_clip (the first step back: 3.35 s), and the faults drop to ~0.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.bench_common import machine_info, wait_quiet, write_result

REPO = Path(__file__).resolve().parents[1]

# ViT-B/32 and B/16 as open_clip defines them; s32 = a narrow shape for quick looks
SHAPES = {
    "b32": dict(image_size=224, patch=32, width=768, layers=12, heads=12, text_width=512, text_layers=12,
                text_heads=8, context=77, vocab=49408, embed=512),
    "b16": dict(image_size=224, patch=16, width=768, layers=12, heads=12, text_width=512, text_layers=12,
                text_heads=8, context=77, vocab=49408, embed=512),
    "s32": dict(image_size=224, patch=32, width=384, layers=6, heads=6, text_width=256, text_layers=6,
                text_heads=4, context=77, vocab=49408, embed=256),
    "tiny": dict(image_size=32, patch=8, width=32, layers=2, heads=2, text_width=32, text_layers=2,
                 text_heads=2, context=16, vocab=1000, embed=32),  # tests
}


class _Vocab:
    """What MultimodalModel needs from a tokenizer to size the text tower (ids are random here)."""

    def __init__(self, n: int):
        self.n, self.pad_token_id = n, 0

    def __len__(self) -> int:
        return self.n


def build_open_clip(shape: dict, precision: str, device: torch.device,
                    foreach: bool = False) -> tuple[Callable, torch.nn.Module]:
    """open_clip's training step as its main.py runs it. ``foreach=True``: AdamW's multi-tensor path, which torch
    picks by itself only for CUDA tensors (on CPU open_clip's AdamW is torch's per-tensor loop)."""
    from open_clip.loss import ClipLoss
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    model = CLIP(shape["embed"],
                 CLIPVisionCfg(layers=shape["layers"], width=shape["width"], patch_size=shape["patch"],
                               image_size=shape["image_size"], head_width=shape["width"] // shape["heads"]),
                 CLIPTextCfg(context_length=shape["context"], vocab_size=shape["vocab"], width=shape["text_width"],
                             heads=shape["text_heads"], layers=shape["text_layers"])).to(device)
    # open_clip's main.py: no weight decay on gains, biases, embeddings and logit_scale; default AdamW implementation
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW(
        [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
         {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": 0.2}],
        lr=5e-4, betas=(0.9, 0.98), eps=1e-6, foreach=foreach or None)
    loss_fn = ClipLoss()
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" \
        else contextlib.nullcontext

    def step(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        with autocast():
            image_features, text_features, logit_scale = model(images, texts)[:3]
            loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return loss.detach()

    return step, model


def build_mlmm(shape: dict, precision: str, device: torch.device, batch: int, zero_stage: int,
               compile: bool = False, text_arch: str = "clip") -> tuple[Callable, torch.nn.Module]:
    from mlmm.config import build_config
    from mlmm.data.batch import Batch
    from mlmm.losses import ContrastiveLoss
    from mlmm.models.model import MultimodalModel
    from mlmm.training import distributed
    from mlmm.training.engine import TrainModule, compile_towers, compute_dtype, initialize

    distributed.init_distributed()
    cfg = build_config({
        "data": {"train_shards": "unused", "batch_size": batch},
        "model": {"embed_dim": shape["embed"],
                  "image": {"image_size": shape["image_size"], "patch_size": shape["patch"], "width": shape["width"],
                            "layers": shape["layers"], "heads": shape["heads"]},
                  "text": {"tokenizer": "unused", "arch": text_arch, "hidden": shape["text_width"],
                           "layers": shape["text_layers"], "heads": shape["text_heads"],
                           "intermediate": 4 * shape["text_width"], "max_length": shape["context"]}},
        "loss": {"name": "contrastive", "pairs": [["image", "text"]]},
        "train": {"precision": precision, "zero_stage": zero_stage, "lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6,
                  "weight_decay": 0.2, "warmup_steps": 0, "max_steps": 10**6,
                  "ds_config": str(REPO / "ds_config.json")},
    })
    model = MultimodalModel(cfg.model, _Vocab(shape["vocab"]))
    if compile:
        compile_towers(model)
    module = TrainModule(model, ContrastiveLoss(cfg.loss, model.modalities))
    engine, ds_cfg = initialize(cfg, module, device)
    dtype = compute_dtype(ds_cfg)
    keys = [f"s{i}" for i in range(batch)]
    ones = torch.ones(batch, dtype=torch.bool, device=device)

    def step(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:  # = Trainer.train_step's engine calls
        attention = (texts != 0).long()
        keep = min(texts.shape[1], max(8, -(-int(attention.sum(1).max()) // 8) * 8))  # as mlmm's collate pads
        b = Batch(keys=keys, image=images.to(dtype), image_mask=ones, text_ids=texts[:, :keep],
                  text_attention=attention[:, :keep], text_mask=ones)
        out = engine(b)
        engine.backward(out["loss"])
        engine.step()
        return out["loss"].detach()

    return step, engine.module


def build_trainer(shape: dict, precision: str, batch: int, zero_stage: int, text_arch: str, work: Path,
                  workers: int, log_every: int):
    """mlmm's real training loop for the shape: a Trainer over generated JPEG + caption shards (written to `work`
    once) with its own BPE tokenizer (so a smaller text vocabulary than `shape`), the loader, the language and
    bad-data checks, the NaN guard and logging every `log_every` updates."""
    from mlmm.config import build_config
    from mlmm.synthetic.shapes import generate
    from mlmm.data.tokenization import train_tokenizer
    from mlmm.data.write_shards import write_shards
    from mlmm.training import Trainer

    data = work / f"data_{shape['image_size']}"
    if not (data / "shards" / "index.json").is_file():
        rows = generate(data / "gen", n_images=max(4 * batch, 64), n_videos=0, n_audio=0, size=shape["image_size"],
                        seed=0, progress=False)
        write_shards(data / "gen" / "manifest.jsonl", data / "shards", shard_size=max(batch, 16), progress=False)
        train_tokenizer((c for r in rows for caps in r["captions"].values() for c in caps), data / "tok",
                        vocab_size=1000)
    cfg = build_config({
        "output_dir": str(work / "run"),
        "data": {"train_shards": str(data / "shards"), "batch_size": batch, "num_workers": workers,
                 "shuffle_buffer": 4 * batch},
        "model": {"embed_dim": shape["embed"],
                  "image": {"image_size": shape["image_size"], "patch_size": shape["patch"], "width": shape["width"],
                            "layers": shape["layers"], "heads": shape["heads"]},
                  "text": {"tokenizer": str(data / "tok"), "arch": text_arch, "hidden": shape["text_width"],
                           "layers": shape["text_layers"], "heads": shape["text_heads"],
                           "intermediate": 4 * shape["text_width"], "max_length": shape["context"]}},
        "loss": {"name": "contrastive", "pairs": [["image", "text"]]},
        "train": {"precision": precision, "zero_stage": zero_stage, "lr": 5e-4, "betas": [0.9, 0.98], "eps": 1e-6,
                  "weight_decay": 0.2, "warmup_steps": 0, "max_steps": 10**6, "log_every": log_every,
                  "progress": False, "tensorboard": False, "resume": "never",
                  "ds_config": str(REPO / "ds_config.json")},
    })
    return Trainer(cfg).setup()


def measure_trainer(args: argparse.Namespace, precision: str, batch: int, device: torch.device) -> dict:
    """Seconds per update of ``Trainer.run_step`` (loader, checks, guards, logging, the engine calls) and of the
    engine calls alone on batches already on the device, same trainer, alternating over ``--reps``."""
    import tempfile

    work = Path(args.workdir or tempfile.mkdtemp(prefix="mlmm_throughput_"))
    trainer = build_trainer(SHAPES[args.shape], precision, batch, args.zero_stage, args.text_arch, work,
                            args.trainer_workers, args.trainer_log_every)
    batches = trainer.batches()
    on_device = trainer.prepare(next(iter(trainer.loader))).normalize_images(trainer.dtype)

    def engine_step() -> None:  # what the engine-only figure of `measure` times
        out = trainer.engine(on_device)
        trainer.engine.backward(out["loss"])
        trainer.engine.step()

    steps = {"train_step": lambda: trainer.run_step(batches), "engine_only": engine_step}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    loads = []
    for rep in range(args.reps):
        loads.append(wait_quiet(args.max_load, label=f"trainer rep {rep + 1}"))
        for name in (list(steps) if rep % 2 == 0 else list(steps)[::-1]):
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                steps[name]()
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
    trainer.cleanup()
    out = {name: {"step_s": statistics.median(ts), "step_s_all": ts, "samples_per_s": batch / statistics.median(ts)}
           for name, ts in times.items()}
    out["overhead"] = out["train_step"]["step_s"] / out["engine_only"]["step_s"] - 1
    out.update(load_1m_all=loads, loader_workers=args.trainer_workers, log_every=args.trainer_log_every,
               text_vocab=len(trainer.tokenizer))
    return out


def step_flops(step: Callable, images: torch.Tensor, texts: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(images, texts)
    return counter.get_total_flops()


def matmul_peak(precision: str, device: torch.device, n: int = 4096, reps: int = 3) -> float:
    """FLOP/s of an n x n x n matmul in `precision`: the denominator of MFU."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def child_peak_rss(args: argparse.Namespace, framework: str, precision: str, batch: int) -> float:
    """Peak RSS (GiB) of a child process that builds `framework` and runs 3 steps (CPU memory figure)."""
    cmd = [sys.executable, "-m", "benchmarks.throughput", "--shape", args.shape, "--batch", str(batch),
           "--precision", precision, "--zero-stage", str(args.zero_stage), "--text", args.text,
           "--text-arch", args.text_arch, "--_child", framework]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}  # the child is its own 1-process world
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"memory child for {framework} failed:\n{out.stderr[-2000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def run_child(args: argparse.Namespace) -> None:
    device = torch.device("cpu")
    shape, batch, precision = SHAPES[args.shape], args.batch[0], args.precision[0]
    step = (build_open_clip(shape, precision, device)[0] if args._child == "open_clip"
            else build_mlmm(shape, precision, device, batch, args.zero_stage, text_arch=args.text_arch)[0])
    images, texts = make_data(shape, batch, device, args.text)
    for _ in range(3):
        step(images, texts)
    # VmHWM (peak RSS of this process image): ru_maxrss would carry over the forking parent's peak across exec
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) / 2**20)  # KiB -> GiB


MULTI30K = REPO.parent / "shared" / "data" / "multi30k" / "train_5k.jsonl"


def caption_lengths(context: int) -> list[int]:
    """Token counts (CLIP BPE, with start/end tokens) of real captions: Multi30K en/de/fr/cs when available."""
    import open_clip

    if not MULTI30K.is_file():
        raise FileNotFoundError(f"--text captions needs {MULTI30K} (Multi30K captions) for real caption lengths")
    rows = [json.loads(line) for line in MULTI30K.read_text(encoding="utf-8").splitlines() if line.strip()]
    captions = [c for r in rows for c in r["captions"].values()]
    ids = open_clip.get_tokenizer("ViT-B-32")(captions, context_length=context)
    return (ids != 0).sum(1).tolist()


def make_data(shape: dict, batch: int, device: torch.device, text: str = "full") -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and token ids [B, context]; `text="captions"`: rows end (zeros after) at real caption lengths."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, shape["image_size"], shape["image_size"], generator=g).to(device)
    texts = torch.randint(1, shape["vocab"], (batch, shape["context"]), generator=g)
    if text == "captions":
        lengths = caption_lengths(shape["context"])
        pick = torch.randint(0, len(lengths), (batch,), generator=g)
        for row, i in enumerate(pick.tolist()):
            texts[row, lengths[i]:] = 0
    return images, texts.to(device)


def bf16_is_fast(device: torch.device) -> bool:
    """False on CPUs without bf16 matmul units (AVX2-only): there bf16 runs far slower than fp32. On CPU the flags
    decide (AVX512-bf16 or AMX); without them, a timing (a single short one once misjudged a busy AVX512-bf16 box)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    info = machine_info()
    if info.get("avx512_bf16") or info.get("amx_bf16"):
        return True
    return matmul_peak("bf16", device, n=1024, reps=3) > 0.5 * matmul_peak("fp32", device, n=1024, reps=3)


def measure(args: argparse.Namespace, precision: str, batch: int, device: torch.device) -> dict:
    shape = SHAPES[args.shape]
    images, texts = make_data(shape, batch, device, args.text)
    steps = {"open_clip": build_open_clip(shape, precision, device)[0],
             "mlmm": build_mlmm(shape, precision, device, batch, args.zero_stage, text_arch=args.text_arch)[0]}
    if args.open_clip_foreach:
        steps["open_clip_foreach"] = build_open_clip(shape, precision, device, foreach=True)[0]
    if args.compile:
        steps["mlmm_compiled"] = build_mlmm(shape, precision, device, batch, args.zero_stage, compile=True,
                                            text_arch=args.text_arch)[0]
    flops = {}
    for name, step in steps.items():  # warm-up (excluded; includes compilation) + one counted step for the FLOPs
        for _ in range(args.warmup):
            step(images, texts)
        flops[name] = step_flops(step, images, texts) if name != "mlmm_compiled" else flops["mlmm"]
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps)
    loads = []
    for rep in range(args.reps):  # interleaved, order rotated: a slow phase of a shared machine hits all
        loads.append(wait_quiet(args.max_load, label=f"{precision} rep {rep + 1}"))
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            step = steps[name]
            sync(device)
            t = time.perf_counter()
            for _ in range(args.steps):
                loss = step(images, texts)
            sync(device)
            times[name].append((time.perf_counter() - t) / args.steps)
            assert torch.isfinite(loss), f"{name}: non-finite loss"
    loads.append(wait_quiet(args.max_load, label=f"{precision} matmul peak"))
    peak = matmul_peak(precision, device)
    out = {"precision": precision, "batch": batch, "text": args.text, "matmul_peak_tflops": peak / 1e12,
           "load_1m_all": loads, "frameworks": {}}  # the load before each repetition, then before the matmul peak
    for name in steps:
        t = statistics.median(times[name])
        out["frameworks"][name] = {"step_s": t, "step_s_all": times[name], "samples_per_s": batch / t,
                                   "gflop_per_sample": flops[name] / batch / 1e9,
                                   "tflops": flops[name] / t / 1e12, "mfu": flops[name] / t / peak}
    if device.type == "cuda":
        names = list(steps)
        del steps
        for name in names:  # rebuild one at a time for a clean peak-memory figure
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            step = build_open_clip(shape, precision, device)[0] if name == "open_clip" else \
                build_mlmm(shape, precision, device, batch, args.zero_stage, compile=name == "mlmm_compiled",
                           text_arch=args.text_arch)[0]
            for _ in range(2):
                step(images, texts)
            out["frameworks"][name]["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            del step
    elif args.memory:
        for name in ("open_clip", "mlmm"):
            out["frameworks"][name]["peak_rss_gib"] = child_peak_rss(args, name, precision, batch)
    if args.trainer:
        out["trainer"] = measure_trainer(args, precision, batch, device)
    best_mlmm = max(f["samples_per_s"] for n, f in out["frameworks"].items() if n.startswith("mlmm"))
    out["ratio_mlmm_over_open_clip"] = best_mlmm / out["frameworks"]["open_clip"]["samples_per_s"]
    if "open_clip_foreach" in out["frameworks"]:
        out["ratio_mlmm_over_open_clip_foreach"] = best_mlmm / out["frameworks"]["open_clip_foreach"]["samples_per_s"]
    return out


# glibc malloc: serve allocations up to 32 MiB (its maximum) from the heap and never trim it back to the OS
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def main(argv=None) -> int:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="b32")
    parser.add_argument("--batch", type=int, nargs="+", default=[256, 1024] if cuda else [16])
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"],
                        default=["bf16"] if cuda else ["fp32", "bf16"])
    parser.add_argument("--zero-stage", type=int, default=None,
                        help="mlmm's ZeRO stage; default 0 on one process (nothing to partition: ZeRO-2's gradient "
                             "buckets cost ~25%% of a CPU step there), 2 under a multi-process launcher")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--max-load", type=float, default=None,
                        help="wait until the 1-minute load average is below this before each repetition (and the "
                             "matmul peak); the loads seen are recorded (runs[].load_1m_all)")
    parser.add_argument("--memory", action="store_true", help="CPU: also measure peak RSS in child processes")
    parser.add_argument("--compile", action="store_true", help="also time mlmm with torch.compile'd towers")
    parser.add_argument("--open-clip-foreach", action="store_true",
                        help="also time open_clip with AdamW(foreach=True) (what torch picks on CUDA): shows how "
                             "much of the ratio on CPU is the optimizer")
    parser.add_argument("--text", choices=["full", "captions"], default="full",
                        help="full: every text row is `context` tokens (identical shapes for both); captions: rows "
                             "end at real Multi30K caption lengths (open_clip still runs all `context` positions)")
    parser.add_argument("--text-arch", choices=["clip", "bert"], default="clip",
                        help="mlmm's text tower: clip = native CLIP-style tower (model.text.arch: clip, what a "
                             "from-scratch recipe uses), bert = transformers BERT (dropout 0.1, post-LN)")
    parser.add_argument("--no-trainer", dest="trainer", action="store_false",
                        help="skip timing mlmm's real step (Trainer.run_step: loader, checks, guards, logging) "
                             "beside its engine calls")
    parser.add_argument("--trainer-workers", type=int, default=2, help="loader workers of the real-step trainer")
    parser.add_argument("--trainer-log-every", type=int, default=10, help="its train.log_every")
    parser.add_argument("--workdir", default=None, help="where the real-step trainer's generated shards go "
                                                        "(default: a temporary folder)")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU: keep glibc's default malloc settings (see the module docstring)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.zero_stage is None:
        args.zero_stage = 0 if int(os.environ.get("WORLD_SIZE", 1)) == 1 else 2
    if args._child:
        run_child(args)
        return 0
    if (argv is None and not cuda and not args.default_malloc
            and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items())):
        sys.stdout.flush()  # malloc reads its environment at start-up: re-run this script (not a caller) with it
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.throughput", *sys.argv[1:]],
                  {**os.environ, **MALLOC_ENV})
    device = torch.device("cuda" if cuda else "cpu")
    runs, skipped = [], []
    for precision in args.precision:
        if precision == "bf16" and not bf16_is_fast(device):
            print("bf16: skipped, this CPU has no bf16 matmul units (bf16 matmul is slower than fp32 here)")
            skipped.append("bf16: no bf16 matmul units on this CPU (AVX2 only); bf16 matmul slower than fp32")
            continue
        for batch in args.batch:
            r = measure(args, precision, batch, device)
            runs.append(r)
            for name, f in r["frameworks"].items():
                mem = f.get("peak_mem_gib", f.get("peak_rss_gib"))
                print(f"{args.shape} {precision:4s} batch {batch:5d} {name:9s}: {f['samples_per_s']:8.2f} samples/s "
                      f"{f['tflops']:7.3f} TFLOP/s  MFU {f['mfu']:6.1%}  {f['gflop_per_sample']:.1f} GFLOP/sample"
                      + (f"  peak {mem:.2f} GiB" if mem is not None else ""))
            if "trainer" in r:
                t = r["trainer"]
                print(f"  mlmm real step (Trainer.run_step, {t['loader_workers']} loader workers): "
                      f"{t['train_step']['samples_per_s']:.2f} samples/s; its engine calls alone "
                      f"{t['engine_only']['samples_per_s']:.2f} samples/s (overhead {t['overhead']:+.1%})")
            print(f"  ratio mlmm / open_clip = {r['ratio_mlmm_over_open_clip']:.2f}x  "
                  f"(matmul peak {r['matmul_peak_tflops']:.2f} TFLOP/s)"
                  + (f"; vs open_clip with foreach AdamW {r['ratio_mlmm_over_open_clip_foreach']:.2f}x"
                     if "ratio_mlmm_over_open_clip_foreach" in r else ""))
    best = {"open_clip": max(r["frameworks"]["open_clip"]["samples_per_s"] for r in runs),
            "mlmm": max(f["samples_per_s"] for r in runs for n, f in r["frameworks"].items() if n.startswith("mlmm"))}
    summary = {"best_samples_per_s": best, "best_ratio": best["mlmm"] / best["open_clip"]}
    if args.open_clip_foreach:
        best["open_clip_foreach"] = max(r["frameworks"]["open_clip_foreach"]["samples_per_s"] for r in runs)
        summary["best_ratio_vs_open_clip_foreach"] = best["mlmm"] / best["open_clip_foreach"]
    print(f"best: mlmm {best['mlmm']:.2f} vs open_clip {best['open_clip']:.2f} samples/s -> "
          f"{summary['best_ratio']:.2f}x")
    result = {"shape": args.shape, "shape_detail": SHAPES[args.shape], "mlmm_zero_stage": args.zero_stage,
              "mlmm_text_arch": args.text_arch, "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
              "runs": runs, "skipped": skipped, **summary, "command": " ".join(sys.argv)}
    path = write_result(f"throughput_{device.type}_{args.shape}_{args.text}", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
