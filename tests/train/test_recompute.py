"""Activation recompute (``model.recompute``, Megatron's full recompute) changes memory, never results.

Reference: the same tiny model, same seed and batches, without recompute. Checked on one gloo rank and on CP=2:
- the trainer's step (:class:`~dsa_dist.train.step.StepFunction` through Megatron's schedule, 2 micro-batches) in
  the warm-up stage (frozen embedding: the recomputed layers must still run their backward) and the sparse stage:
  the reported LM loss and KL, and every parameter's reduced gradient (``main_grad``);
- the model directly in sparse mode: the top-k recorded in the forward and again by the recomputed forward, the
  logged KL and recall, and every gradient, also with a replayed top-k and with dropout on (RNG replay);
- a non-attaching tracker with full recompute is refused (its KL would silently not train the indexer).

Recompute re-runs the same float32 CPU ops in the same order, so the tolerances are tight.
"""

from __future__ import annotations

import pytest
import torch

from tests._dist import run_distributed
from tests.train._tiny import tiny_config

SEED = 1234
RECOMPUTE = {"model.recompute.granularity": "full", "model.recompute.method": "uniform",
             "model.recompute.num_layers": 1}
NO_KEEP = {**RECOMPUTE, "model.recompute.keep_topk": "false"}
SELECTIVE = {"model.recompute.granularity": "selective", "model.recompute.modules": "[mlp]"}


def _batches(cfg, n: int, seed: int) -> list:
    from dsa_dist.train.data import Batch

    g = torch.Generator().manual_seed(seed)
    b, s, v = cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.vocab_size
    out = []
    for i in range(n):
        seq = torch.randint(0, v, (b, s + 1), generator=g)
        mask = (torch.rand(b, s, generator=g) > 0.1).float()
        out.append(Batch(tokens=seq[:, :-1], labels=seq[:, 1:], loss_mask=mask, sample_ids=torch.arange(b) + i * b))
    return out


def _trainer_step(cfg, stage: str) -> dict:
    """Reports and reduced gradients of one forward/backward over 2 micro-batches (no optimizer update)."""
    from dsa_dist.parallel.groups import current_parallel_dims
    from dsa_dist.train.cpu_scope import in_megatron_cpu_scope
    from dsa_dist.train.setup import build_model_and_optimizer
    from dsa_dist.train.stages import resolve_stage
    from dsa_dist.train.step import StepFunction

    plan = resolve_stage(cfg, stage)
    parts = build_model_and_optimizer(cfg, plan)
    step = StepFunction(parts, plan, current_parallel_dims(), torch.device("cpu"), clip_grad=0.0,
                        max_nonfinite_steps=5)
    parts.ddp.zero_grad_buffer()
    reports = in_megatron_cpu_scope(step._run_schedule)(_batches(cfg, 2, SEED), forward_only=False,
                                                        micro_batch_size=plan.micro_batch_size)
    lm, kl, _ = step.reduce_reports(reports)
    grads = {n: p.main_grad.detach().clone() for n, p in parts.gpt.named_parameters() if p.requires_grad}
    return {"lm": lm, "kl": kl, "grads": grads, "attached": parts.tracker.attach_coeff is not None}


def _model_direct(cfg) -> dict:
    """Sparse model without DDP: recorded top-k (forward and recompute), logged KL/recall, grads, replay grads."""
    from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
    from dsa_dist.model.runtime import SPARSE_TRAIN
    from dsa_dist.parallel import zigzag_split
    from dsa_dist.parallel.groups import current_parallel_dims
    from dsa_dist.train.setup import manual_seed

    dims = current_parallel_dims()
    manual_seed(SEED)
    model = build_model(cfg.model, runtime=SPARSE_TRAIN)
    tracker = get_indexer_loss_tracker(model)
    batch = _batches(cfg, 1, SEED + 1)[0]
    tokens, labels = (zigzag_split(t, 1, dims.cp, dims.cp_rank) for t in (batch.tokens, batch.labels))

    from dsa_dist.model import dsa_core

    selects = []  # indexer top-k selections run (the recomputed forward replays the kept ones by default)
    select_topk = dsa_core.select_topk

    def counted(*a, **kw):
        selects.append(1)
        return select_topk(*a, **kw)

    dsa_core.select_topk = counted

    def run(**options) -> dict:
        selects.clear()
        model.zero_grad(set_to_none=True)
        tracker.begin_forward(**options)
        lm = model(tokens, None, None, labels=labels).mean()
        out = {"topk_fwd": tracker.topk(), "recall": tracker.recall()}
        loss = lm if tracker.attach_coeff is not None else lm + cfg.model.indexer_loss_coeff * tracker.total()
        loss.backward()
        # KL values after the backward: the fused sparse KL writes its value there (NaN before).
        out.update(kl=tracker.values(), kl_total=float(tracker.logged_total()))
        out.update(lm=float(lm.detach()), topk_after=tracker.topk(), kl_after=tracker.values(), selects=len(selects),
                   grads={n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return out

    res = {"plain": run(record_topk=True, measure_recall=True)}
    # Replay a different (still causal) selection: the recorded one with its last slot emptied.
    replay = {layer: idx.clone() for layer, idx in res["plain"]["topk_fwd"].items()}
    for idx in replay.values():
        idx[..., -1] = -1
    res["replay"] = run(replay_topk=replay)
    # Dropout draws from the RNG: the recomputed forward must replay the first forward's masks (Megatron saves and
    # restores the RNG states around it). The config keeps dropout at 0, so it is switched on in the layers here.
    for layer in model.decoder.layers:
        layer.hidden_dropout = 0.3
    torch.manual_seed(SEED + 2)
    res["dropout"] = run()
    dsa_core.select_topk = select_topk
    return res


def _worker(rank: int, world_size: int, run_dir: str) -> dict:
    from dsa_dist.parallel import init_parallel

    init_parallel(1, world_size)
    torch.manual_seed(SEED)
    out = {}
    for name, extra in (("base", {}), ("recompute", RECOMPUTE)):
        cfg = tiny_config(run_dir, world_size=world_size, parallel__cp=world_size,
                          **{k.replace(".", "__"): v for k, v in extra.items()})
        out[name] = {"warmup": _trainer_step(cfg, "warmup"), "sparse": _trainer_step(cfg, "sparse"),
                     "direct": _model_direct(cfg)}
    if world_size == 1:  # selective recompute (the MLPs): the model directly
        cfg = tiny_config(run_dir, **{k.replace(".", "__"): v for k, v in SELECTIVE.items()})
        out["selective"] = {"direct": _model_direct(cfg)}
        cfg = tiny_config(run_dir, **{k.replace(".", "__"): v for k, v in NO_KEEP.items()})
        out["no_keep"] = {"direct": _model_direct(cfg)}
    return out


def _close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{what} {n}: {m}")


def _check(out: dict) -> None:
    base, rc = out["base"], out["recompute"]
    for stage in ("warmup", "sparse"):
        assert not base[stage]["attached"] and rc[stage]["attached"]
        assert rc[stage]["lm"] == pytest.approx(base[stage]["lm"], rel=1e-6), stage
        assert rc[stage]["kl"] == pytest.approx(base[stage]["kl"], rel=1e-6), stage
        assert base[stage]["kl"] > 0
        # every trained parameter gets a gradient, with the same value (warm-up: the indexers alone)
        assert any(g.abs().sum() > 0 for g in base[stage]["grads"].values())
        _close(rc[stage]["grads"], base[stage]["grads"], f"{stage} grad")
        for n, g in base[stage]["grads"].items():
            assert g.abs().sum() > 0 or stage == "warmup", f"{stage}: {n} got no gradient"
    for mode in ("plain", "replay", "dropout"):
        b, r = base["direct"][mode], rc["direct"][mode]
        assert r["lm"] == pytest.approx(b["lm"], rel=1e-6)
        assert r["kl"] == pytest.approx(b["kl"], rel=1e-6)
        assert r["kl_after"] == pytest.approx(b["kl"], rel=1e-6)  # recompute overwrote, did not add
        assert r["kl_total"] == pytest.approx(sum(b["kl"].values()), rel=1e-6)
        _close(r["grads"], b["grads"], f"direct {mode} grad")
    b, r = base["direct"]["plain"], rc["direct"]["plain"]
    assert b["topk_fwd"] and r["recall"] == pytest.approx(b["recall"], rel=1e-6)
    for layer, idx in b["topk_fwd"].items():
        assert torch.equal(r["topk_fwd"][layer], idx)
        assert torch.equal(r["topk_after"][layer], idx)  # the recomputed forward selected the same keys
    layers = len(b["topk_fwd"])
    # the recomputed forward replayed the kept top-k: no second selection (the user's replay: none at all)
    assert base["direct"]["plain"]["selects"] == rc["direct"]["plain"]["selects"] == layers
    assert base["direct"]["replay"]["selects"] == rc["direct"]["replay"]["selects"] == 0
    for name in ("selective", "no_keep") if "selective" in out else ():
        for mode in ("plain", "replay", "dropout"):
            s = out[name]["direct"][mode]
            assert s["lm"] == pytest.approx(base["direct"][mode]["lm"], rel=1e-6)
            _close(s["grads"], base["direct"][mode]["grads"], f"{name} {mode} grad")
    if "no_keep" in out:  # keep_topk=false: the recomputed forward selects again, with the same result
        nk = out["no_keep"]["direct"]["plain"]
        assert nk["selects"] == 2 * layers
        assert all(torch.equal(nk["topk_after"][la], idx) for la, idx in b["topk_fwd"].items())
    # the replayed selection and the dropout really change the loss
    assert base["direct"]["replay"]["lm"] != b["lm"]
    assert base["direct"]["dropout"]["lm"] != b["lm"]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("world_size", [1, 2], ids=["single", "cp2"])
def test_recompute_matches_no_recompute(tmp_path, world_size):
    outs = run_distributed(_worker, world_size, str(tmp_path), timeout=380)
    for out in outs:
        _check(out)


def test_full_recompute_refuses_a_non_attaching_tracker():
    from dataclasses import replace

    from dsa_dist.model.builder import build_model
    from dsa_dist.model.config import RecomputeConfig, preset
    from dsa_dist.model.indexer_loss import IndexerLossTracker
    from dsa_dist.model.runtime import SPARSE_TRAIN, WARMUP
    from tests._dist import single_rank_parallel

    cfg = replace(preset("tiny"), recompute=RecomputeConfig(granularity="full"))
    with single_rank_parallel():
        with pytest.raises(ValueError, match="attaching tracker"):
            build_model(cfg, runtime=SPARSE_TRAIN, tracker=IndexerLossTracker())
        assert build_model(cfg, runtime=WARMUP).decoder.layers[0].self_attention.tracker.attach_coeff == 1.0


@pytest.mark.parametrize("field,value,match", [
    ("granularity", "partial", "recompute.granularity"),
    ("method", "every", "recompute.method"),
    ("num_layers", 0, "recompute.num_layers"),
    ("num_layers", 3, "larger than num_layers=2"),
    ("modules", ("core_attn",), "core_attn"),
    ("modules", ("layernorm",), "Transformer Engine"),
    ("modules", (), "empty"),
])
def test_recompute_config_errors_name_the_field(field, value, match):
    from dataclasses import replace

    from dsa_dist.model.config import RecomputeConfig, preset

    rc = {"granularity": "selective" if field == "modules" else "full", field: value}
    with pytest.raises(ValueError, match=match):
        replace(preset("tiny"), recompute=RecomputeConfig(**rc)).validate()


def test_full_recompute_with_grpo_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.recompute.granularity.*grpo"):
        tiny_config(tmp_path, pipeline="[sparse,grpo]", model__recompute__granularity="full")
