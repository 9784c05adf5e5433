"""Threshold-filtered exact top-k (kernels/topk_filter.py, ``indexer_topk.SELECT_IMPL = "filter"``) against the
dense-workspace path and the reference op.

CPU: under Triton's interpreter (one subprocess, tests/_interpret.py). Every case compares the filtered path bit
for bit with the workspace path on the same inputs, and, for integer-valued inputs (exact fp32 scores, many
ties), with the reference op. The adversarial rows force each branch: thresholds too high (hits < k) and too low
(hits > CAP) through the ``TARGET_SCALE`` knob, all-equal scores, a plateau of exact zeros (ReLU) at the k-th
value, rows with fewer than CAP / k causal keys, B > 1, explicit and unsorted positions, per-sequence decode
positions; ``LAST_FALLBACK`` shows which branch ran. Seeds are fixed in each case.

GPU (``-m gpu``): fresh random FP8 inputs (seed logged) at the V3.2 and small shapes and a ReLU-plateau case,
outputs poisoned: the filtered path equals the workspace path bit for bit.
"""

from __future__ import annotations

import functools

import pytest
import torch

from tests._inputs import integer_indexer_inputs, poison_cuda_cache
from tests._interpret import check_interpreted, run_interpreted


def _both(q, k, w, topk, ks=None, **kw):
    """(workspace result, filtered result, (sequence, query) rows the filtered call re-ran densely; −1: the
    filtered driver did not run)."""
    import kernels.indexer_topk as kt
    import kernels.topk_filter as tf

    kt.SELECT_IMPL = "workspace"
    want = kt.lightning_indexer_topk(q, k, w, topk, ks, **kw)
    kt.SELECT_IMPL = "filter"
    tf.LAST_FALLBACK = None
    try:
        got = kt.lightning_indexer_topk(q, k, w, topk, ks, **kw)
    finally:
        kt.SELECT_IMPL = "workspace"
    return want, got, -1 if tf.LAST_FALLBACK is None else int(tf.LAST_FALLBACK)


def _assert_same(got, want, bits=True):
    """Equal indices and scores; ``bits``: scores bit for bit (−0.0 ≠ +0.0), as two kernel paths must be (the
    reference op may round a sum of zeros to the other sign: it is compared by value)."""
    (s1, i1), (s2, i2) = got, want
    assert i1.dtype == torch.int32 and s1.dtype == torch.float32 and i1.shape == i2.shape
    bad = (i1 != i2).any(-1).nonzero()
    if bad.numel():
        row = tuple(bad[0])
        raise AssertionError(f"rows {bad[:4].tolist()}: got {i1[row].tolist()} want {i2[row].tolist()}")
    assert torch.equal(s1.view(torch.int32), s2.view(torch.int32)) if bits else torch.equal(s1, s2)


def _knobs(fn):
    """Restore the module knobs a case changes."""

    @functools.wraps(fn)
    def run(*args):
        import kernels.indexer_topk as kt
        import kernels.topk_filter as tf

        try:
            return fn(*args)
        finally:
            tf.SAMPLE_STRIDE, tf.TARGET_SCALE, kt.TARGET_PROGRAMS, kt.SELECT_IMPL = None, 1.0, None, "workspace"

    return run


def _long_rows(row_len, cap):
    """Query rows (any sequence) with more than CAP keys: the ones a threshold applies to."""
    return int((row_len > cap).reshape(-1, row_len.shape[-1]).any(0).sum())


# ---------------------------------------------------------------------------------------------------------------
# cases run inside the interpreter subprocess
# ---------------------------------------------------------------------------------------------------------------
@_knobs
def _case_random_rows_strided_sample():
    """Random scores, B = 2, chunked: the threshold from a strided sample settles most rows on the filtered path
    (the check passes), the rest go through the fallback; the result equals the workspace path's."""
    import kernels.topk_filter as tf
    from dsa_dist.ops.topk import lightning_indexer_topk as ref

    g = torch.Generator().manual_seed(11)
    q, k, w = torch.randn(2, 112, 4, 32, generator=g), torch.randn(2, 112, 32, generator=g), torch.rand(2, 112, 4)
    for stride, chunk in ((1, None), (3, 40)):
        tf.SAMPLE_STRIDE = stride
        want, got, fallback = _both(q, k, w, 8, chunk_size=chunk)
        _assert_same(got, want)
        # rows 16.. have > CAP = 16 keys. Stride 1: the r-th largest of the whole row keeps exactly r ≈ 11 hits
        # (no ties), inside [k, CAP]: no fallback. Stride 3: r ≈ 4 sampled scores, a noisy guess: some rows fail.
        assert fallback == 0 if stride == 1 else 0 < fallback < 2 * (112 - 16), (stride, fallback)
    # the reference agrees on the selection (scores equal to fp32 rounding)
    ref_s, ref_i = ref(q, k, w, 8)
    torch.testing.assert_close(got[0], ref_s, rtol=1e-5, atol=1e-5)
    assert (got[1] == ref_i).float().mean() >= 0.99


@_knobs
def _case_forced_thresholds_too_high_and_too_low():
    """TARGET_SCALE 0.25: every threshold keeps < k scores; 4: > CAP (or −inf). Every row with more than CAP keys
    fails the check and is re-run densely; exact ties included (integer inputs), equal to the reference."""
    import kernels.topk_filter as tf
    from dsa_dist.ops.topk import lightning_indexer_topk as ref

    g = torch.Generator().manual_seed(12)
    q, k, w = torch.randn(1, 120, 4, 32, generator=g), torch.randn(1, 120, 32, generator=g), torch.rand(1, 120, 4)
    tf.SAMPLE_STRIDE = 1
    for scale in (0.25, 4.0):
        tf.TARGET_SCALE = scale
        want, got, fallback = _both(q, k, w, 8)
        _assert_same(got, want)
        assert fallback == 120 - 16, (scale, fallback)  # all rows with > CAP = 16 causal keys
    qi, ki, wi, ks = integer_indexer_inputs(2, 72, 72, 4, 32, seed=13)
    tf.SAMPLE_STRIDE = 3
    for scale in (0.25, 4.0):
        tf.TARGET_SCALE = scale
        want, got, fallback = _both(qi, ki, wi, 8, ks, chunk_size=30)
        _assert_same(got, want)
        _assert_same(got, ref(qi, ki, wi, 8, ks), bits=False)
        assert fallback > 72 - 16, (scale, fallback)  # most of the 2 · 56 long rows (exact ties can keep ≥ k)


@_knobs
def _case_equal_scores_and_relu_zero_plateau():
    """All scores equal (zero weights): every threshold keeps all keys (> CAP), the fallback returns the lowest
    indices. A ReLU plateau: most keys score exactly 0 (±0.0 by the weight's sign), a few positive, k above the
    positive count, so the k-th value sits on the zero plateau."""
    from dsa_dist.ops.topk import lightning_indexer_topk as ref

    q, k, w, ks = integer_indexer_inputs(2, 64, 64, 4, 32, seed=14)
    want, got, fallback = _both(q, k, torch.zeros_like(w), 8, ks)
    _assert_same(got, want)
    assert fallback == 2 * (64 - 16) and torch.equal(got[1][1, 50], torch.arange(8, dtype=torch.int32))
    g = torch.Generator().manual_seed(15)
    qp = torch.rand(2, 72, 4, 32, generator=g) + 0.5  # positive queries
    kp = -torch.rand(2, 72, 32, generator=g)  # keys with q·k < 0: score exactly 0
    kp[:, ::9] = torch.rand(2, 8, 32, generator=g)  # every 9th key scores > 0
    wp = torch.randint(-1, 3, (2, 72, 4), generator=g).float()  # negative weights: −0.0 / negative scores too
    for topk in (4, 12):
        want, got, fallback = _both(qp, kp, wp, topk, chunk_size=32)
        _assert_same(got, want)
        ref_s, ref_i = ref(qp, kp, wp, topk)  # float inputs: scores equal to fp32 rounding, the same keys
        assert torch.equal(got[1], ref_i)
        torch.testing.assert_close(got[0], ref_s, rtol=1e-5, atol=1e-5)
        assert fallback > 0


@_knobs
def _case_positions_dtypes_nan():
    """CP shard (explicit q/k positions), unsorted positions (no causal prefix), e4m3 operands (gathered as bytes
    for the fallback), and a NaN key scale (no valid key) on the filtered path."""
    import kernels.indexer_topk as kt
    import kernels.topk_filter as tf
    from dsa_dist.ops.topk import lightning_indexer_topk as ref

    q, k, w, _ = integer_indexer_inputs(1, 64, 128, 3, 48, seed=16)
    kt.SELECT_IMPL = "radix"
    try:
        kt.lightning_indexer_topk(q, k, w, 4)
        raise AssertionError("an unknown SELECT_IMPL was accepted")
    except ValueError as err:
        assert "SELECT_IMPL must be 'filter' or 'workspace'" in str(err), err
    qp = torch.arange(64, 128)
    want, got, _ = _both(q, k, w, 20, q_positions=qp)
    _assert_same(got, want)
    _assert_same(got, ref(q, k, w, 20, q_positions=qp), bits=False)
    q, k, w, ks = integer_indexer_inputs(2, 80, 80, 4, 32, seed=17)
    perm = torch.randperm(80, generator=torch.Generator().manual_seed(18))
    tf.SAMPLE_STRIDE = 3
    want, got, _ = _both(q, k, w, 6, ks, q_positions=perm, k_positions=perm)
    _assert_same(got, want)
    _assert_same(got, ref(q, k, w, 6, ks, q_positions=perm, k_positions=perm), bits=False)
    q, k, w, ks = integer_indexer_inputs(1, 64, 64, 4, 64, dtype=torch.float8_e4m3fn, seed=19)
    for scale in (1.0, 0.25):  # 0.25: every long row through the fallback's byte gather
        tf.TARGET_SCALE = scale
        want, got, fallback = _both(q, k, w, 4, ks)
        _assert_same(got, want)
        _assert_same(got, ref(q.float(), k.float(), w, 4, ks), bits=False)
    assert fallback > 0  # (exact ties can keep ≥ k hits even at 0.25: not every long row fails)
    tf.TARGET_SCALE = 1.0
    g = torch.Generator().manual_seed(20)
    q, k, w = torch.randn(2, 60, 4, 32, generator=g), torch.randn(2, 60, 32, generator=g), torch.rand(2, 60, 4)
    scale = torch.ones(2, 60)
    scale[:, 3] = torch.tensor(0xFFC00000, dtype=torch.int64).to(torch.int32).view(torch.float32)  # −NaN
    scale[:, 5] = float("-inf")  # score −inf (or NaN where the head sum is 0): no key either
    for topk in (4, 64):  # 64 > Lk: every other causal key is selected, the rest of the row is (−inf, −1)
        want, got, _ = _both(q, k, w, topk, scale)
        _assert_same(got, want)
        assert not ((got[1] == 3) | (got[1] == 5)).any() and int(got[1].max()) < 60


@_knobs
def _case_decode_shapes():
    """Decode: one query per sequence at its own position (q_positions [B, 1]) over a shared key range, short
    rows included. With the default program target (CPU: 1) the filtered path runs; with a target above B·Lq
    the call keeps the workspace path (no host synchronisation at decode) and the filtered code is not entered."""
    import kernels.indexer_topk as kt
    import kernels.topk_filter as tf
    from dsa_dist.ops.topk import lightning_indexer_topk as ref

    q, k, w, ks = integer_indexer_inputs(3, 1, 300, 4, 32, seed=21)
    pos = torch.tensor([[299], [120], [5]])
    for scale in (1.0, 0.25):
        tf.TARGET_SCALE = scale
        want, got, fallback = _both(q, k, w, 8, ks, q_positions=pos)
        _assert_same(got, want)
        _assert_same(got, ref(q, k, w, 8, ks, q_positions=pos), bits=False)
        assert fallback >= 0 and (scale == 1.0 or fallback == 2)  # sequences 0 and 1 have more than CAP keys
    kt.TARGET_PROGRAMS = 24
    want, got, fallback = _both(q, k, w, 8, ks, q_positions=pos)
    _assert_same(got, want)
    assert fallback == -1  # the filtered driver did not run
    # a few queries per sequence, one long row each: the filtered path runs (B·Lq = 8 ≥ 8 programs) with the key
    # range split over 4 programs (their hits share each row's atomic counter), and the failing rows' dense re-run
    # uses the same split
    kt.TARGET_PROGRAMS = 8
    q, k, w, ks = integer_indexer_inputs(2, 4, 300, 4, 32, seed=22)
    pos = torch.tensor([[299, 3, 4, 5], [150, 6, 1, 0]])
    for scale in (1.0, 0.25):
        tf.TARGET_SCALE = scale
        want, got, fallback = _both(q, k, w, 4, ks, q_positions=pos)
        _assert_same(got, want)
        _assert_same(got, ref(q, k, w, 4, ks, q_positions=pos), bits=False)
    assert fallback == 2


@_knobs
def _case_no_host_sync():
    """The filtered path, fallback included (thresholds forced too high), asks for no host synchronisation: the
    failing rows are re-run on the device (docs/design.md, "No host sync per layer")."""
    import kernels.indexer_topk as kt
    import kernels.topk_filter as tf
    from tests._host_sync import HostSyncRecorder

    q, k, w, ks = integer_indexer_inputs(1, 48, 48, 4, 32, seed=23)
    tf.TARGET_SCALE = 0.25
    kt.SELECT_IMPL = "filter"
    with HostSyncRecorder() as rec:
        got = kt.lightning_indexer_topk(q, k, w, 4, ks)
    assert rec.calls == [], rec.calls
    assert int(tf.LAST_FALLBACK) > 0
    kt.SELECT_IMPL = "workspace"
    _assert_same(got, kt.lightning_indexer_topk(q, k, w, 4, ks))


@_knobs
def _case_benchmark_rows():
    """benchmarks/indexer_topk.py's end-to-end rows for both paths (two sample ranks) run with CPU inputs, timings
    replaced by one call each; the phase replays leave the exact result in the output buffers; the table renders
    every row with the speedup column."""
    import benchmarks.indexer_topk as bench
    import kernels.indexer_topk as kt

    g = torch.Generator().manual_seed(24)
    length, topk = 64, 8
    q, k, w = torch.randn(1, length, 4, 32, generator=g), torch.randn(1, length, 32, generator=g), torch.rand(1, 64, 4)
    inp = type("Inputs", (), {"q_index": q, "k_index": k, "weights": w, "k_scale": None})
    bench.fp8_indexer_inputs = lambda *args, **kw: inp
    bench.median_ms = lambda fn, rep: (fn(), 1.0)[1]
    bench.peak_extra_gib = lambda fn: (fn(), 0.0)[1]
    results = []
    bench.bench_end_to_end(4, 32, topk, length, ["workspace", "filter"], [64, 16], results)
    rows = [r for r in results if r["what"] == "indexer_topk"]
    assert [r["impl"] for r in rows] == ["workspace", "filter r=64 S=1", "filter r=16 S=1"], rows
    assert all(r["fallback_rows"] is None if r["impl"] == "workspace" else r["fallback_rows"] >= 0 for r in rows)
    table = bench.tables(results)
    assert "| filter r=16 S=1 | 4 | 32 | 8 | 64 | 1.00 | 0 | 1.00× |" in table, table
    # the phase replays compute the real thing: the workspace path's select leaves the exact top-k
    qp, kp, wp, _ = kt._prepare(q, k, w, None)
    pos = torch.arange(length)
    o_s, o_i = torch.full((1, length, topk), float("nan")), torch.full((1, length, topk), -7, dtype=torch.int32)
    bench._workspace_phases(qp, kp, wp, None, pos, kt._row_lengths(pos, pos), topk, length, o_s, o_i, 1, 4, [])
    _assert_same((o_s, o_i), kt.lightning_indexer_topk(q, k, w, topk))


CASES = ["_case_benchmark_rows", "_case_no_host_sync", "_case_random_rows_strided_sample",
         "_case_forced_thresholds_too_high_and_too_low", "_case_equal_scores_and_relu_zero_plateau",
         "_case_positions_dtypes_nan", "_case_decode_shapes"]


@pytest.fixture(scope="module")
def interpreted():
    return run_interpreted(__name__, CASES)


@pytest.mark.parametrize("case", CASES)
def test_topk_filter_interpreted(interpreted, case):
    check_interpreted(interpreted, case)


# ---------------------------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------------------------
def _gpu_compare(b, length, heads, dim, topk, plateau=False, shard=False):
    """Workspace and filtered paths on the same fresh FP8 inputs, outputs poisoned: equal bit for bit, indices in
    range. ``plateau``: 15 of 16 keys are e4m3 zeros (score exactly 0), so every row with more than CAP keys
    (and fewer than 16·k) has its k-th value on the zero plateau. ``shard``: the last half of the queries
    (explicit positions, as a CP rank holds them) against all keys."""
    import kernels.indexer_topk as kt
    import kernels.topk_filter as tf
    from tests.kernels.test_indexer_kernels import make_indexer_inputs

    inp = make_indexer_inputs(b, length, heads, dim)
    k_index, q_index, weights, q_positions = inp.k_index, inp.q_index, inp.weights, None
    if plateau:
        k8 = k_index.view(torch.uint8).clone()
        k8[:, torch.arange(length, device="cuda") % 16 != 0] = 0
        k_index = k8.view(k_index.dtype)
    if shard:
        half = length // 2
        q_index, weights = q_index[:, half:], weights[:, half:]
        q_positions = torch.arange(half, length, device="cuda")
    outs = {}
    for impl in ("workspace", "filter"):
        kt.SELECT_IMPL = impl
        poison_cuda_cache(b * length * topk * 8 + 2**28)
        try:
            outs[impl] = kt.lightning_indexer_topk(q_index, k_index, weights, topk, inp.k_scale,
                                                   q_positions=q_positions)
        finally:
            kt.SELECT_IMPL = "workspace"
        torch.cuda.synchronize()
    (s1, i1), (s2, i2) = outs["filter"], outs["workspace"]
    fallback = int(tf.LAST_FALLBACK)
    print(f"B={b} L={length} H={heads} k={topk} plateau={plateau} shard={shard}: fallback rows {fallback} of "
          f"{b * q_index.shape[1]}")
    assert int(i1.min()) >= -1 and int(i1.max()) < length
    assert torch.equal(i1, i2), (i1 != i2).any(-1).nonzero()[:4].tolist()
    assert torch.equal(s1.view(torch.int32), s2.view(torch.int32))
    return fallback


@pytest.mark.gpu
@pytest.mark.parametrize("heads,dim,topk", [(64, 128, 2048), (8, 64, 512)])
def test_filtered_topk_gpu_equals_workspace(heads, dim, topk, gpu_seed):
    fallback = _gpu_compare(1, 8192, heads, dim, topk)
    assert fallback < 8192 // 10, fallback  # the filter settles most rows (else it cannot pay off)


@pytest.mark.gpu
def test_filtered_topk_gpu_plateau_batched_shard(gpu_seed):
    assert _gpu_compare(2, 4096, 8, 64, 512, plateau=True) > 0  # the plateau rows went through the fallback
    _gpu_compare(2, 6000, 64, 128, 2048, shard=True)
