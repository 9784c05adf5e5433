"""The DSA core shared by the MLA and GQA attentions (DESIGN.md §1–§2): indexer top-k, attention, indexer KL.

Inputs are batch-first and local to this rank: queries of this rank's tokens and heads, its tokens' KV and the
indexer inputs. The function applies the parallel layout from outside the single-device math:

- **CP** (sequence split zigzag over ``cp`` ranks): the compact KV is all-gathered with autograd (backward
  reduce-scatters dKV to its owners), the top-k of the local queries comes from the CP primitive
  :func:`dsa_dist.parallel.distributed_indexer_topk` (FP8 index keys exchanged, global indices returned) and
  attention runs on local queries against the gathered KV with global positions; the KL uses float index keys
  gathered with autograd. Losses are means over local rows: their average over CP ranks is the CP=1 value.
- **TP** (heads split over ``tp`` ranks): the indexer scores only the strided query rows ``tp_rank::tp`` and the
  indices are all-gathered (see :mod:`dsa_dist.model.indexer` for why); the KL of those rows needs all heads'
  queries and log-sum-exps, brought over by one all-to-all (detached: the target carries no gradient).

Gradient separation: the indexer sees detached inputs (hidden states and query latent) in both modes, and the
KL target is detached, so the KL trains only the indexer and the attention output trains only the main model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from dsa_dist.model.config import DSAModelConfig
from dsa_dist.model.indexer import LightningIndexer
from dsa_dist.model.indexer_loss import IndexerLossTracker, attach_loss
from dsa_dist.ops import dense_attention, dispatch


@dataclass
class ParallelGroups:
    """The TP and CP groups of this rank (sizes/ranks cached: they are read on every layer call)."""

    tp_group: object = None
    tp_size: int = 1
    tp_rank: int = 0
    cp_group: object = None
    cp_size: int = 1
    cp_rank: int = 0

    @classmethod
    def from_megatron(cls) -> ParallelGroups:
        from megatron.core import parallel_state as ps

        if not ps.model_parallel_is_initialized():
            return cls()
        return cls(
            tp_group=ps.get_tensor_model_parallel_group(), tp_size=ps.get_tensor_model_parallel_world_size(),
            tp_rank=ps.get_tensor_model_parallel_rank(), cp_group=ps.get_context_parallel_group(),
            cp_size=ps.get_context_parallel_world_size(), cp_rank=ps.get_context_parallel_rank(),
        )


def local_positions(local_len: int, groups: ParallelGroups, device: torch.device) -> torch.Tensor:
    """Global positions [local_len] of this rank's tokens (zigzag chunks under CP, ``arange`` otherwise)."""
    if groups.cp_size == 1:
        return torch.arange(local_len, device=device)
    from dsa_dist.parallel import check_cp_config, zigzag_positions

    check_cp_config(local_len * groups.cp_size, groups.cp_size)
    return zigzag_positions(local_len * groups.cp_size, groups.cp_size, groups.cp_rank, device=device)


def check_local_length(local_len: int, groups: ParallelGroups) -> None:
    """Clear errors for sequence lengths the layout cannot split (before any collective)."""
    if groups.tp_size > 1 and local_len % groups.tp_size:
        raise ValueError(
            f"this rank's sequence length {local_len} (= seq_len / cp) is not divisible by tp={groups.tp_size}: the "
            "indexer splits query rows across TP ranks; pad the sequence to a multiple of 2*cp*tp or change tp"
        )


# ---------------------------------------------------------------------------------------------- TP helpers
class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward all-reduces (sums) the gradient over the TP group.

    Megatron's ``copy_to_tensor_model_parallel_region`` does the same but all-reduces ``grad.contiguous()`` and
    returns the original tensor, so a non-contiguous gradient (dense attention's dK of a sliced latent, for
    one) silently stays unreduced; this version reduces a contiguous copy and returns that.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def sum_grad_over_tp(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """``x`` unchanged; its gradient is summed over TP ranks (for a TP-replicated tensor used by split heads)."""
    if groups.tp_size == 1:
        return x
    return _SumGradOverTP.apply(x, groups.tp_group)


def _rows_to_all(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[B, L/tp, ...] of rows ``r::tp`` on each TP rank → [B, L, ...] (all rows, in order) on every rank."""
    if groups.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(groups.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=groups.tp_group)
    # Rank j holds rows j, j+tp, ...: stacking on a new dim after the row dim interleaves them back.
    return torch.stack(parts, dim=2).flatten(1, 2)


def _heads_to_rows(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[B, L, H/tp, ...] (this rank's heads, all rows) → [B, L/tp, H, ...] (all heads, rows ``r::tp``). No grad."""
    if groups.tp_size == 1:
        return x
    tp = groups.tp_size
    send = torch.stack([x[:, j::tp] for j in range(tp)]).contiguous()  # [tp(dest), B, L/tp, H/tp, ...]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=groups.tp_group)  # recv[j]: rank j's heads for my rows
    return recv.movedim(0, 2).flatten(2, 3)  # heads of rank j are heads j*H/tp.. in the global order


def _all_heads(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """[B, L, Hkv/tp, d] → [B, L, Hkv, d] (GQA keys of every TP rank, for the KL target). No grad."""
    if groups.tp_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(groups.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=groups.tp_group)
    return torch.cat(parts, dim=2)


# ---------------------------------------------------------------------------------------------- CP helpers
def _gather_seq(x: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    if groups.cp_size == 1:
        return x
    from dsa_dist.parallel import all_gather_sequence

    return all_gather_sequence(x, 1, groups.cp_group)


class _Ready:
    """A finished 'gather' (CP=1): same interface as :class:`dsa_dist.parallel.PendingSequenceGather`."""

    def __init__(self, x: torch.Tensor) -> None:
        self._x = x

    def wait(self) -> torch.Tensor:
        return self._x


def _gather_seq_async(x: torch.Tensor, groups: ParallelGroups):
    """Start the sequence all-gather of ``x``; ``.wait()`` gives the full sequence (autograd-connected)."""
    if groups.cp_size == 1:
        return _Ready(x)
    from dsa_dist.parallel import all_gather_sequence

    return all_gather_sequence(x, 1, groups.cp_group, async_op=True)


def _topk(indexer_in, topk: int, q_pos: torch.Tensor, k_pos: torch.Tensor, groups: ParallelGroups,
          mode: str) -> torch.Tensor:
    """Global top-k indices [B, Lq, k] int32 of the given query rows over all keys of the sequence."""
    q, k, w, s = indexer_in.q_index, indexer_in.k_index, indexer_in.weights, indexer_in.k_scale
    if groups.cp_size == 1:
        return dispatch.lightning_indexer_topk(q, k, w, topk, s, q_positions=q_pos, k_positions=k_pos)[1]
    from dsa_dist.parallel import distributed_indexer_topk

    # Under TP the queries are this rank's TP subset of its tokens (explicit q_positions), keys all its tokens.
    return distributed_indexer_topk(q, w, k, s, topk, q_positions=q_pos, k_positions_local=k_pos,
                                    group=groups.cp_group, mode=mode)[1]


# ---------------------------------------------------------------------------------------------- the core
def dsa_core(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    *,
    v_dim: int | None,
    indexer: LightningIndexer,
    indexer_h: torch.Tensor,
    indexer_cq: torch.Tensor,
    positions: torch.Tensor,
    dsa: DSAModelConfig,
    groups: ParallelGroups,
    softmax_scale: float,
    tracker: IndexerLossTracker | None,
    layer: int,
    compute_kl: bool,
) -> torch.Tensor:
    """One DSA attention on this rank's tokens and heads.

    Args:
        q: [B, Ll, H/tp, d_qk] queries (rope applied; MLA: absorbed into the latent space).
        k: [B, Ll, Hkv', d_qk] this rank's keys (MLA: the latent, Hkv' = 1; GQA: Hkv/tp heads).
        v: [B, Ll, Hkv', d_v], or None with ``v_dim`` set: ``v = k[..., :v_dim]`` (MLA: V is the latent's first
            kv_lora dims, so one tensor is gathered over CP).
        indexer_h, indexer_cq: [B, Ll, hidden] / [B, Ll, q_in] indexer inputs (detached here).
        positions: [Ll] global positions of this rank's tokens.
        compute_kl: record the indexer KL in ``tracker`` (training).

    Returns:
        [B, Ll, H/tp, d_v] attention output.
    """
    b, ll = q.shape[:2]
    check_local_length(ll, groups)
    seq_len = ll * groups.cp_size
    k_pos_full = torch.arange(seq_len, device=q.device)

    # KV of the whole sequence (autograd: backward reduce-scatters dKV to the owning CP rank). Started now and
    # awaited after the indexer's top-k, so the transfer overlaps the scoring.
    k_pending = _gather_seq_async(k, groups)
    v_pending = None if v is None else _gather_seq_async(v, groups)

    # Indexer on this rank's TP share of the query rows; inputs detached (the KL trains the indexer only).
    h_d, cq_d = indexer_h.detach(), indexer_cq.detach()
    rows = slice(groups.tp_rank, None, groups.tp_size)
    q_pos = positions[rows]
    q_i, w_i = indexer.project_queries(cq_d[:, rows], h_d[:, rows])  # [B, Ll/tp, H_I, d_I], [B, Ll/tp, H_I]
    k_i = indexer.project_keys(h_d)  # [B, Ll, d_I]
    sparse = dsa.dsa_mode == "sparse"
    want_recall = compute_kl and tracker is not None and tracker.compute_recall
    want_topk = tracker is not None and tracker.keep_topk
    topk_rows = None
    if sparse or want_recall or want_topk:
        prepared = indexer.prepare_for_topk(q_i, k_i, w_i, q_positions=q_pos, k_positions=positions)
        topk_rows = _topk(prepared, dsa.indexer.topk, q_pos, positions, groups, dsa.indexer.cp_topk_mode)
        if tracker is not None:
            tracker.record_topk(layer, q_pos, topk_rows)
    k_full = k_pending.wait()
    v_full = k_full[..., :v_dim] if v_pending is None else v_pending.wait()
    if sparse:
        topk_all = _rows_to_all(topk_rows, groups)  # [B, Ll, k] global key indices, same on every TP rank
        out, lse = dispatch.sparse_attention(q, k_full, v_full, topk_all, softmax_scale)
    else:
        out, lse = dense_attention(q, k_full, v_full, softmax_scale, q_positions=positions, k_positions=k_pos_full)

    if not compute_kl or tracker is None:
        return out
    # KL on this rank's rows with all heads: target from detached queries/keys and the attention's lse.
    with torch.no_grad():
        q_t = _heads_to_rows(q.detach(), groups)  # [B, Ll/tp, H, d_qk]
        lse_t = _heads_to_rows(lse.detach(), groups)  # [B, Ll/tp, H]
        # GQA keys are split over TP by head (gather them); the MLA latent is one head replicated on every rank.
        k_t = _all_heads(k_full.detach(), groups) if v is not None else k_full.detach()
    kl_in = indexer.prepare_for_kl(q_i, k_i, w_i, q_positions=q_pos, k_positions=positions)
    k_index_full = _gather_seq(kl_in.k_index, groups)  # [B, L, d_I]
    if sparse:
        kl = dispatch.indexer_kl_loss_sparse(q_t, k_t, kl_in.q_index, k_index_full, kl_in.weights, topk_rows,
                                             attn_lse=lse_t, softmax_scale=softmax_scale)
    else:
        kl = dispatch.indexer_kl_loss_dense(q_t, k_t, kl_in.q_index, k_index_full, kl_in.weights, attn_lse=lse_t,
                                            softmax_scale=softmax_scale, q_positions=q_pos, k_positions=k_pos_full)
    tracker.record(layer, kl)
    if want_recall:
        tracker.record_recall(layer, _recall(q_t, k_t, topk_rows, q_pos, softmax_scale, dsa.indexer.recall_rows))
    if tracker.attach_coeff is not None:
        out = attach_loss(out, kl, tracker.attach_coeff)
    return out


@torch.no_grad()
def _recall(q: torch.Tensor, k: torch.Tensor, topk: torch.Tensor, q_pos: torch.Tensor, scale: float,
            n_rows: int) -> torch.Tensor:
    """Mean share of the head-averaged dense attention mass that falls on the top-k set, over ``n_rows`` rows
    evenly spaced among this rank's rows (latest rows first: they have the most keys to choose from)."""
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    sel = torch.linspace(lq - 1, 0, min(n_rows, lq), device=q.device).round().long().unique()
    qs = q[:, sel].float().reshape(b, sel.numel(), hkv, h // hkv, d)
    logits = torch.einsum("bngjd,bkgd->bngjk", qs, k.float()).flatten(2, 3) * scale  # [B, n, H, L]
    future = torch.arange(k.shape[1], device=q.device)[None, :] > q_pos[sel][:, None]  # [n, L]
    probs = torch.softmax(logits.masked_fill(future[None, :, None], float("-inf")), -1).mean(2)  # [B, n, L]
    idx = topk[:, sel].long()
    covered = probs.gather(-1, idx.clamp_min(0)) * (idx >= 0)
    return covered.sum(-1).mean()
