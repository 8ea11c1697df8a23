"""The ``mlmm`` logger of a training run: ``<output_dir>/train.log`` and the console on rank 0, warnings elsewhere."""
from __future__ import annotations

import logging
from pathlib import Path


def setup_logging(output_dir: Path, is_main: bool) -> None:
    """INFO logs of the ``mlmm`` logger to ``<output_dir>/train.log`` and, unless the application configured
    logging itself (root handlers), to the console. Records still propagate (pytest's caplog, user handlers)."""
    logger = logging.getLogger("mlmm")
    if not is_main:
        logger.setLevel(logging.WARNING)
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    logger.setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    log_file = str((output_dir / "train.log").resolve())
    for h in [h for h in logger.handlers if isinstance(h, logging.FileHandler) and h.baseFilename != log_file]:
        logger.removeHandler(h)  # a previous run in this process: its log file is done
        h.close()
    if not any(isinstance(h, logging.FileHandler) for h in logger.handlers):
        handler = logging.FileHandler(log_file)
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    console = [h for h in logger.handlers if type(h) is logging.StreamHandler]
    if not logging.getLogger().handlers and not console:
        handler = logging.StreamHandler()
        handler.setFormatter(fmt)
        logger.addHandler(handler)
