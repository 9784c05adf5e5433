"""The three stages on the tiny model (DESIGN.md §1 "Losses"): what each one trains and that it learns.

One process runs dense -> warmup -> sparse (tests/_dist.py worker, gloo world of 1); the assertions check:
- dense: the indexers stay frozen (bitwise) while the model trains;
- warmup: only indexer parameters change (every other parameter bitwise unchanged), and the indexer KL on
  fixed held-out batches drops over 30 steps;
- sparse: the LM loss on the same held-out batches (in sparse mode) drops.
"""

from __future__ import annotations

import torch

from tests.train._tiny import held_out_batches, run_ranks, tiny_config


def _snapshot(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.gpt.named_parameters()}


def _changed(before: dict, after: dict) -> dict[str, bool]:
    return {n: not torch.equal(before[n], after[n]) for n in before}


def _stages_worker(rank: int, world_size: int, run_dir: str) -> dict:
    from dsa_dist.parallel import init_parallel
    from dsa_dist.train.checkpoint import latest_checkpoint
    from dsa_dist.train.loop import StageTrainer

    cfg = tiny_config(run_dir)
    init_parallel(1, 1)
    out: dict = {}

    dense = StageTrainer(cfg, "dense")
    before = _snapshot(dense)
    out["dense_history"] = dense.run()
    out["dense_changed"] = _changed(before, _snapshot(dense))
    held_out = held_out_batches(dense)

    warm = StageTrainer(cfg, "warmup", init_from=latest_checkpoint(f"{run_dir}/dense/checkpoints"))
    before = _snapshot(warm)
    out["warm_start_equals_dense_end"] = all(torch.equal(before[n], p) for n, p in _snapshot(dense).items())
    out["warm_eval_before"] = warm.eval_loss(held_out)
    out["warm_history"] = warm.run()
    out["warm_eval_after"] = warm.eval_loss(held_out)
    out["warm_changed"] = _changed(before, _snapshot(warm))

    sparse = StageTrainer(cfg, "sparse", init_from=latest_checkpoint(f"{run_dir}/warmup/checkpoints"))
    out["sparse_eval_before"] = sparse.eval_loss(held_out)
    out["sparse_history"] = sparse.run()
    out["sparse_eval_after"] = sparse.eval_loss(held_out)
    return out


def test_dense_warmup_sparse(tmp_path):
    out = run_ranks(_stages_worker, 1, str(tmp_path))[0]
    indexer = {n for n in out["dense_changed"] if ".indexer." in n}
    assert indexer and len(indexer) < len(out["dense_changed"])

    # dense: the model trains, the indexers are frozen
    assert {n for n, c in out["dense_changed"].items() if not c} == indexer
    lm = [r["lm_loss"] for r in out["dense_history"]]
    assert sum(lm[-5:]) / 5 < sum(lm[:5]) / 5 - 1.0

    # warmup: only indexer parameters change; the KL on held-out batches drops
    assert out["warm_start_equals_dense_end"]
    assert {n for n, c in out["warm_changed"].items() if c} == indexer
    kl0, kl1 = out["warm_eval_before"]["indexer_kl"], out["warm_eval_after"]["indexer_kl"]
    assert kl1 < 0.7 * kl0, (kl0, kl1)
    assert out["warm_eval_after"]["lm_loss"] == out["warm_eval_before"]["lm_loss"]  # model untouched, bitwise
    hist = out["warm_history"]
    assert all(r["indexer_lr"] is not None and r["lr"] is None for r in hist)  # only the indexer group exists
    kl_train = [r["indexer_kl"] for r in hist]
    assert sum(kl_train[-5:]) < sum(kl_train[:5])

    # sparse: all parameters train, LM loss on the held-out batches drops
    lm0, lm1 = out["sparse_eval_before"]["lm_loss"], out["sparse_eval_after"]["lm_loss"]
    assert lm1 < lm0 - 0.05, (lm0, lm1)
    assert all(r["lr"] is not None and r["indexer_lr"] is not None for r in out["sparse_history"])
