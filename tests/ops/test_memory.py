"""Chunked top-k, KL and dense attention (forward + backward) at L = 16K stay far below one L×L fp32 (1 GiB).

Peak resident memory is read from ``getrusage`` in a fresh subprocess. glibc's *dynamic* mmap threshold would
otherwise keep freed large blocks on the heap and make RSS grow with the number of chunks, so the child pins
``MALLOC_MMAP_THRESHOLD_``; a small warm-up call first loads the math libraries.
"""

import os
import subprocess
import sys
import textwrap

import pytest

L = 16384
LxL_FP32_MIB = L * L * 4 / 2**20  # 1024 MiB
BOUND_MIB = LxL_FP32_MIB / 4

CHILD = textwrap.dedent(
    """
    import resource, sys, torch
    from dsa_dist.ops import dense_attention, indexer_kl_loss_dense, lightning_indexer_topk
    torch.manual_seed(0)

    def run(L):
        qi, ki, w = torch.randn(1, L, 2, 16), torch.randn(1, L, 16), torch.randn(1, L, 2)
        q, k = torch.randn(1, L, 2, 16), torch.randn(1, L, 1, 16)
        if sys.argv[1] == "topk":
            lightning_indexer_topk(qi, ki, w, 64, chunk_size=256)
        elif sys.argv[1] == "dense":
            q.requires_grad_()
            dense_attention(q, k, k, chunk_size=128)[0].sum().backward()
            assert q.grad is not None
        else:
            qi.requires_grad_()
            indexer_kl_loss_dense(q, k, qi, ki, w, chunk_size=128).backward()
            assert qi.grad is not None

    run(512)  # warm-up: thread pools, kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run(int(sys.argv[2]))
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("op", ["topk", "kl", "dense"])
def test_peak_memory_is_sub_quadratic(op):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", CHILD, op, str(L)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    peak_mib = float(out.stdout.strip().splitlines()[-1])
    assert peak_mib < BOUND_MIB, f"{op} at L={L} grew peak RSS by {peak_mib:.0f} MiB (bound {BOUND_MIB:.0f})"
