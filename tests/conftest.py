import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/tiny.py and friends
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# model caches and weight digests of this run stay out of the user's ~/.cache/scorer
os.environ.setdefault("SCORER_CACHE", tempfile.mkdtemp(prefix="scorer-test-cache-"))


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001 - torch missing counts as "no CUDA"
        return False


def pytest_collection_modifyitems(config, items):
    if _cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (pytest.mark.gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
