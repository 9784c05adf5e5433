"""A training step's DSA layer asks for no host synchronisation (docs/design.md, "No host sync per layer").

One DSA attention layer (tiny presets, sparse training: indexer top-k + sparse attention + sparse KL, with recall
and top-k recording/replay) runs forward and backward under :class:`tests._host_sync.HostSyncRecorder`, which
lists every call that would wait for the GPU on CUDA (``.item()``, ``bool(t)``, ``.tolist()``, ``nonzero``,
``torch.tensor(..., device=)``, ...). The reference ops run in-process; the Triton kernels run in the interpreter
in a child process (``DSA_BACKEND=triton``). On a GPU, ``torch.cuda.set_sync_debug_mode("error")`` proves it.
"""

from __future__ import annotations

import pytest
import torch

from dsa_dist.model.runtime import SPARSE_TRAIN, WARMUP, DSARuntime
from tests._host_sync import HostSyncRecorder
from tests._interpret import check_interpreted, run_interpreted

CASES = ["layer_step:tiny"]  # MLA (v = a view of k); the host code of the kernels is the same for GQA


def _layer(name: str, device: torch.device, runtime: DSARuntime = SPARSE_TRAIN):
    from megatron.core.transformer.spec_utils import build_module

    from dsa_dist.model.indexer_loss import IndexerLossTracker
    from dsa_dist.model.specs import dsa_attention_spec
    from tests.model._configs import model_config

    cfg = model_config(name, init_std=0.3, indexer={"topk": 8})
    tracker = IndexerLossTracker(attach_coeff=1.0)
    torch.manual_seed(0)
    attn = build_module(dsa_attention_spec(cfg, runtime, tracker), config=cfg.to_transformer_config(None),
                        layer_number=1).to(device)
    return cfg, attn, tracker


def _step(attn, tracker, x, **forward_options) -> None:
    tracker.begin_forward(**forward_options)
    out, _ = attn(x, None)
    out.float().square().mean().backward()


def layer_step(name: str) -> None:
    """Forward + backward of one sparse-training DSA layer records no host sync (also run interpreted)."""
    from tests._dist import single_rank_parallel

    with single_rank_parallel():
        cfg, attn, tracker = _layer(name, torch.device("cpu"))
        x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, requires_grad=True)
        _step(attn, tracker, x)  # warm-up: lazy imports, caches
        with HostSyncRecorder() as rec:
            _step(attn, tracker, x, measure_recall=True, record_topk=True)
        recorded = tracker.topk()
        with HostSyncRecorder() as rec_replay:
            _step(attn, tracker, x, replay_topk=recorded)
        assert x.grad is not None and torch.isfinite(x.grad).all()
    assert rec.calls == [], f"host syncs in the DSA layer step: {rec.calls}"
    assert rec_replay.calls == [], f"host syncs in the replayed DSA layer step: {rec_replay.calls}"


CP_MODES = ("ring", "allgather", "candidates")


def _cp_worker(rank: int, world: int) -> dict[str, list[str]]:
    """Each CP top-k mode: one layer step on this rank's zigzag shard; the host syncs it asked for."""
    from megatron.core.transformer.spec_utils import build_module

    from dsa_dist.model.indexer_loss import IndexerLossTracker
    from dsa_dist.model.specs import dsa_attention_spec
    from dsa_dist.parallel import init_parallel
    from tests.model._configs import model_config

    init_parallel(1, world)
    calls = {}
    for mode in CP_MODES:
        cfg = model_config("tiny", init_std=0.3, indexer={"topk": 8, "cp_topk_mode": mode})
        tracker = IndexerLossTracker(attach_coeff=1.0)
        torch.manual_seed(0)
        attn = build_module(dsa_attention_spec(cfg, SPARSE_TRAIN, tracker), config=cfg.to_transformer_config(None),
                            layer_number=1)
        x = torch.randn(cfg.seq_len // world, 2, cfg.hidden_size, requires_grad=True)
        _step(attn, tracker, x)  # warm-up: the cached zigzag rows and chunk permutations are built once
        with HostSyncRecorder() as rec:
            _step(attn, tracker, x, measure_recall=True)
        calls[mode] = rec.calls
    return calls


@pytest.mark.timeout(300)
def test_context_parallel_layer_step_has_no_host_sync():
    """CP=2 on gloo, every top-k mode (ring, allgather, candidates): the distributed top-k, the KV gather and
    its reduce-scatter backward ask for no host sync either."""
    from tests._dist import run_distributed

    for rank, calls in enumerate(run_distributed(_cp_worker, 2, init_process_group=False)):
        for mode in CP_MODES:
            assert calls[mode] == [], f"rank {rank}, cp_topk_mode={mode}: host syncs {calls[mode]}"


def test_recorder_sees_the_syncs_it_looks_for():
    """The recorder is not vacuous: each kind of sync it claims to see is seen."""
    x = torch.arange(6)
    with HostSyncRecorder() as rec:
        bool(x[0] > 0)
        x.sum().item()
        x.tolist()
        x[x > 2]
        x.nonzero()
        torch.tensor([1, 2], device=x.device)
        x.unique()
    assert len(rec.calls) == 7, rec.calls
    assert all(__file__ in call for call in rec.calls), rec.calls


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_reference_layer_step_has_no_host_sync(name):
    layer_step(name)


@pytest.mark.timeout(300)
def test_reference_warmup_layer_step_has_no_host_sync():
    """The indexer warm-up stage (dense attention + dense KL over causal keys) too."""
    from tests._dist import single_rank_parallel

    with single_rank_parallel():
        cfg, attn, tracker = _layer("tiny", torch.device("cpu"), WARMUP)
        x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, requires_grad=True)
        _step(attn, tracker, x)
        with HostSyncRecorder() as rec:
            _step(attn, tracker, x)
    assert rec.calls == [], f"host syncs in the warm-up DSA layer step: {rec.calls}"


@pytest.mark.timeout(600)
def test_triton_layer_step_has_no_host_sync():
    results = run_interpreted("tests.model.test_host_sync", CASES)
    for case in CASES:
        check_interpreted(results, case)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["tiny", "tiny-gqa"])
def test_cuda_layer_step_does_not_synchronise(name, gpu_seed):
    from tests._dist import single_rank_parallel

    with single_rank_parallel():
        cfg, attn, tracker = _layer(name, torch.device("cuda"))
        x = torch.randn(cfg.seq_len, 2, cfg.hidden_size, device="cuda", requires_grad=True)
        _step(attn, tracker, x)  # warm-up: Triton compiles, caches fill
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _step(attn, tracker, x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        assert torch.isfinite(x.grad).all()
