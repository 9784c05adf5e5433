"""Shared pytest setup: a fixed seed for CPU tests, a logged fresh seed for GPU tests, and the ``gpu`` marker.

GPU tests carry ``@pytest.mark.gpu`` and are skipped when no CUDA device is present, so
``python -m pytest tests/kernels -m gpu`` runs exactly them on a GPU machine.
"""

import os

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def gpu_seed(request) -> int:
    """A fresh seed for a random GPU test (new inputs every run), printed and stored so a failure can be
    replayed: ``torch.manual_seed(seed)`` seeds the CPU and every CUDA generator."""
    seed = int.from_bytes(os.urandom(4), "little") >> 1
    torch.manual_seed(seed)
    print(f"{request.node.nodeid}: seed {seed}")
    request.node.user_properties.append(("seed", seed))
    return seed


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
