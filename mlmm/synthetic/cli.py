"""``mlmm-synthetic KIND ...``: one console command for every synthetic data generator (tests, demo, benchmarks).

    mlmm-synthetic shapes --out data/synth --n-images 300 --n-videos 60 --n-audio 200
    mlmm-synthetic vqa --out data/vqa --n-images 400
    mlmm-synthetic KIND --help                    # the generator's own flags

Each KIND runs its module's ``main`` (``python -m <module>`` is the same command).
"""
from __future__ import annotations

import importlib
import sys
from typing import Optional

GENERATORS = {  # kind -> (module, what it writes)
    "shapes": ("mlmm.synthetic.shapes", "labelled shapes, moving shapes and tones with en/de/fr captions"),
    "av": ("mlmm.synthetic.av", "paired video + audio clips and a temporal-order video set"),
    "scenes": ("mlmm.synthetic.scenes", "fine-grained attribute / object scenes (ASCL, VSE, MVSEN)"),
    "vqa": ("mlmm.synthetic.vqa", "a multilingual VQA set over drawn scenes"),
    "composed": ("mlmm.synthetic.composed", "composed image retrieval triplets (reference + modification -> target)"),
    "noisy": ("mlmm.synthetic.noisy", "a manifest with a fraction of its captions shuffled (noisy correspondence)"),
}


def usage() -> str:
    rows = "\n".join(f"  {kind:<9} {what}  ({module})" for kind, (module, what) in GENERATORS.items())
    return f"usage: mlmm-synthetic KIND [--help | generator flags]\n\nKIND:\n{rows}\n"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage() + "\n" + __doc__.split("\n\n")[0])
        return 0
    if argv[0] not in GENERATORS:
        print(f"mlmm-synthetic: unknown KIND {argv[0]!r}\n{usage()}", file=sys.stderr)
        return 2
    code = importlib.import_module(GENERATORS[argv[0]][0]).main(argv[1:])
    return 0 if code is None else int(code)


if __name__ == "__main__":
    sys.exit(main())
