"""Long-context task evals during training: exact-answer accuracy and answer loss (docs/training.md).

One forward pass per batch (teacher forcing): a sample counts as solved when the argmax prediction at every
answer position equals the answer token. Works under TP (logits are gathered over the vocabulary shards) and
CP (answer positions may sit on any CP rank: per-sample counts are summed over the CP group).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dsa_dist.train.data import Batch


@torch.no_grad()
def evaluate_task(model: torch.nn.Module, batches: list[tuple[Batch, torch.Tensor]], *, shard, device) -> dict:
    """Accuracy and mean answer-token loss of one task's eval set.

    ``shard(t)`` maps a full-sequence ``[b, L]`` tensor to this rank's CP shard; ``model`` is the unwrapped
    GPTModel (``model(tokens, None, None)`` returns vocab-parallel logits ``[b, s_local, V/tp]``).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    from dsa_dist.model.builder import get_indexer_loss_tracker

    tracker = get_indexer_loss_tracker(model)
    was_training = model.training
    model.eval()
    solved = total = 0
    loss_sum = torch.zeros((), dtype=torch.float64)
    answer_tokens = torch.zeros((), dtype=torch.float64)
    try:
        for batch, answer_mask in batches:
            tokens, labels = shard(batch.tokens).to(device), shard(batch.labels).to(device)
            mask = shard(answer_mask).to(device)
            tracker.begin_forward()  # plain forward: no recall, no recorded or replayed top-k
            logits = model(tokens, None, None)  # [b, s_local, V/tp]
            logits = gather_from_tensor_model_parallel_region(logits).float()  # [b, s_local, V]
            hit = (logits.argmax(-1) == labels).float() * mask
            nll = F.cross_entropy(logits.transpose(1, 2), labels, reduction="none") * mask  # [b, s_local]
            # Per-sample counts, summed over CP ranks (each holds part of every sequence).
            stats = torch.stack([hit.sum(1), mask.sum(1), nll.sum(1)]).double()  # [3, b]
            cp = ps.get_context_parallel_group() if ps.model_parallel_is_initialized() else None
            if cp is not None and dist.get_world_size(cp) > 1:
                dist.all_reduce(stats, group=cp)
            solved += int((stats[0] == stats[1]).sum())
            total += stats.shape[1]
            loss_sum += stats[2].sum().cpu()
            answer_tokens += stats[1].sum().cpu()
    finally:
        model.train(was_training)
    return {"acc": solved / max(total, 1), "answer_loss": float(loss_sum / answer_tokens.clamp_min(1))}
