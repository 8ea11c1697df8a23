"""Shared by the benchmark scripts: machine description and result writing."""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """CPU model, cores, versions, GPU (if any) and the load average (figures on a busy machine are slower)."""
    cpu = platform.processor()
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == platform.processor():
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    except OSError:
        pass
    info = {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "amx_bf16": "amx_bf16" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import faiss

        info["faiss"] = faiss.__version__
        info["faiss_threads"] = faiss.omp_get_max_threads()
    except ImportError:
        pass
    try:
        info["load_average_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def write_result(name: str, result: dict, out: str | Path | None = None) -> Path:
    """Write ``result`` (+ date and machine) to ``benchmarks/results/<name>.json`` (or `out`)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": machine_info(), **result}
    if LOAD_LOG:
        result["load_log"] = list(LOAD_LOG)
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return path


def load_1m() -> float:
    """The 1-minute load average (/proc/loadavg)."""
    return os.getloadavg()[0]


def _cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


_OWN = {"t": time.monotonic(), "cpu": _cpu_seconds(), "load": 0.0}
LOAD_LOG: list[dict] = []  # one entry per wait_quiet call; write_result stores it as "load_log"


def own_load() -> float:
    """This process's own share of the 1-minute load average, estimated as the kernel averages (exponentially, with
    a 60-s time constant) from the CPU time this process and its finished children used since the last call."""
    now, cpu = time.monotonic(), _cpu_seconds()
    dt = now - _OWN["t"]
    if dt > 0:
        decay = math.exp(-dt / 60.0)
        _OWN.update(t=now, cpu=cpu, load=_OWN["load"] * decay + (cpu - _OWN["cpu"]) / dt * (1.0 - decay))
    return _OWN["load"]


def wait_quiet(max_load: float | None, poll_s: float = 5.0, label: str = "") -> float:
    """Sleep until the load of everything else on the box (the 1-minute load average minus this benchmark's own share,
    :func:`own_load`) is below ``max_load`` (None: do not wait); -> the 1-minute load average seen.

    Timings on a shared box are only comparable when nothing else runs: the benchmarks call this before every
    timed repetition and record what it returns; every call is also logged (load, own share, waiting time) in
    ``LOAD_LOG``. The benchmark's own work is left out of the test so that a 2-thread benchmark does not wait a
    minute after each of its own repetitions for the average to decay.
    """
    start = time.monotonic()
    load, own = load_1m(), own_load()
    announced = False
    while max_load is not None and load - own >= max_load:
        if not announced:
            print(f"  [{label or 'timing'}] load {load:.2f} (own {own:.2f}) >= {max_load}: waiting for a quiet box",
                  file=sys.stderr, flush=True)
            announced = True
        time.sleep(poll_s)
        load, own = load_1m(), own_load()
    LOAD_LOG.append({"label": label, "time": datetime.datetime.now().isoformat(timespec="seconds"),
                     "load_1m": round(load, 2), "own_estimate": round(own, 2), "others": round(load - own, 2),
                     "waited_s": round(time.monotonic() - start, 1)})
    return load
