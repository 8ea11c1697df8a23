import os

import pytest


def pytest_collection_modifyitems(config, items):
    """`slow` tests run locally; under CI=true they are skipped unless MLMM_RUN_SLOW=1."""
    if os.environ.get("CI", "").lower() in ("1", "true") and os.environ.get("MLMM_RUN_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow test: skipped in CI (set MLMM_RUN_SLOW=1 to run)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)
