"""Shared pytest setup: a fixed seed for CPU tests, a logged fresh seed for GPU tests, and the ``gpu`` marker.

GPU tests carry ``@pytest.mark.gpu`` and are skipped when no CUDA device is present, so
``python -m pytest tests/kernels -m gpu`` runs exactly them on a GPU machine.
"""

import os
import signal

import pytest
import torch

# A shell starts background commands with SIGINT ignored (e.g. `nohup make test &`), and an ignored signal stays
# ignored across exec: every run the tests start would then ignore Ctrl-C, and the tests that send SIGINT to a
# training run or a Ray driver would fail for a reason outside the code. A handler (unlike SIG_IGN) is reset to
# the default by exec, so installing Python's own makes SIGINT deliverable in this process and every child.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


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
