"""Shared by the benchmark scripts: machine description and result writing."""
from __future__ import annotations

import datetime
import json
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
    path.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return path


def load_1m() -> float:
    """The 1-minute load average (/proc/loadavg)."""
    return os.getloadavg()[0]


def wait_quiet(max_load: float | None, poll_s: float = 5.0, label: str = "") -> float:
    """Sleep until the 1-minute load average is below ``max_load`` (None: do not wait); -> the load seen.

    Timings on a shared box are only comparable when nothing else runs: the benchmarks call this before every
    timed repetition and record what it returns.
    """
    load = load_1m()
    waited = 0.0
    while max_load is not None and load >= max_load:
        if waited == 0.0:
            print(f"  [{label or 'timing'}] load {load:.2f} >= {max_load}: waiting for a quiet box ...",
                  file=sys.stderr, flush=True)
        time.sleep(poll_s)
        waited += poll_s
        load = load_1m()
    return load
