"""The DSA steps shared by the MLA and GQA attentions (docs/design.md §1–§2): select, attend, indexer KL, recall.

A DSA layer first plans its forward (:func:`plan_dsa_attention`: which steps run; the index keys
:class:`IndexKeys` are made from the layer input, and under CP their all-gathers start here, before the
attention's projections), then, after its projections (:meth:`DSAMLASelfAttention.project` /
:meth:`DSAGQASelfAttention.project` give a :class:`DSAInputs`), runs these steps, each a function of its own:

1. :func:`project_indexer` — the indexer's queries for this rank's TP share of rows (keys: the plan's);
2. :func:`select_topk` — top-k key indices of those rows (local, or the CP-distributed top-k);
3. :func:`attend` — sparse attention over the selected keys, or dense causal attention: ``(out, lse)``;
4. :func:`kl_target` + :func:`indexer_kl` — the indexer KL (dense over all keys, or sparse over the top-k set);
   in the sparse stage (training, tp == 1) steps 3 and 4 are one op instead, :func:`attend_with_sparse_kl`;
5. :func:`indexer_recall` — the recall metric on a few rows.

:func:`dsa_attention` composes them as the plan, the runtime (:class:`~dsa_dist.model.runtime.DSARuntime`) and
this forward's options (:class:`~dsa_dist.model.indexer_loss.IndexerLossTracker`) ask. All tensors are batch-first and
local to this rank. The parallel layout is applied around the single-device math:

- **CP** (sequence split zigzag over ``cp`` ranks): the compact KV is all-gathered with autograd (backward
  reduce-scatters dKV to its owners), the top-k of the local queries comes from
  :func:`dsa_dist.parallel.distributed_indexer_topk` (FP8 index keys exchanged, global indices returned) and
  attention runs on local queries against the gathered KV; the KL uses float index keys gathered with autograd.
  Every exchange is started before the work that needs it and the backward reduce-scatters are waited for where
  their gradients are consumed (docs/context_parallel.md, "Overlap"). Losses are means over local rows: their
  average over CP ranks is the CP=1 value.
- **TP** (heads split over ``tp`` ranks): the indexer scores only the strided rows ``tp_rank::tp`` and the indices
  are all-gathered (:mod:`dsa_dist.model.indexer` says why); the KL of those rows needs all heads' queries and
  log-sum-exps, brought over by one all-to-all (:mod:`dsa_dist.parallel.tp`; detached: the target has no grad).

Gradient separation: the indexer sees detached inputs (hidden states and query latent), and the KL target is
detached, so the KL trains only the indexer and the attention output trains only the main model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsa_dist.model.config import DSAModelConfig
from dsa_dist.model.cp_exchanges import IndexKeys, PendingKV
from dsa_dist.model.indexer import LightningIndexer
from dsa_dist.model.indexer_loss import IndexerLossTracker, attach_loss
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.ops import dispatch
from dsa_dist.ops._checks import assert_on_device
from dsa_dist.parallel.groups import ParallelDims
from dsa_dist.parallel.tp import all_heads, heads_to_rows, rows_to_all


@dataclass(frozen=True)
class DSAInputs:
    """What an attention's projections hand to the DSA steps (this rank's tokens and heads, batch-first)."""

    q: torch.Tensor
    """[B, Ll, H/tp, d_qk] queries, rope applied (MLA: absorbed into the latent space)."""
    k: torch.Tensor
    """[B, Ll, Hkv', d_qk] keys (MLA: the latent, Hkv' = 1, replicated over TP; GQA: Hkv/tp heads)."""
    v: torch.Tensor | None
    """[B, Ll, Hkv', d_v] values, or None: ``v = k[..., :v_dim]`` (MLA: V is the latent's first kv_lora dims)."""
    v_dim: int
    """d_v of the core attention."""
    indexer_h: torch.Tensor
    """[B, Ll, hidden] the indexer's key/weight input (the layer input)."""
    indexer_cq: torch.Tensor
    """[B, Ll, q_in] the indexer's query input (MLA: the query latent c_q; GQA: the layer input)."""
    positions: torch.Tensor
    """[Ll] global positions of these tokens."""


@dataclass(frozen=True)
class IndexerRows:
    """Indexer projections of this rank's TP share of query rows (``tp_rank::tp``) and of all its tokens' keys."""

    q: torch.Tensor
    """[B, Ll/tp, H_I, d_I] raw query projections."""
    w: torch.Tensor
    """[B, Ll/tp, H_I] head weights (scaled)."""
    keys: IndexKeys
    """The keys of every local token, prepared for the top-k and the KL, with their CP exchanges."""
    q_positions: torch.Tensor
    """[Ll/tp] global positions of the query rows."""
    k_positions: torch.Tensor
    """[Ll] global positions of the keys."""


@dataclass(frozen=True)
class KLTarget:
    """Detached attention data of this rank's indexer rows with *all* heads: what the KL target is made of."""

    q: torch.Tensor
    """[B, Ll/tp, H, d_qk] queries."""
    k: torch.Tensor
    """[B, L, Hkv, d_qk] keys of the whole sequence."""
    lse: torch.Tensor
    """[B, Ll/tp, H] log-sum-exp of the attention's logits."""


def check_local_length(local_len: int, dims: ParallelDims) -> None:
    """Clear error for a local sequence the TP row split cannot divide (before any collective)."""
    if dims.tp > 1 and local_len % dims.tp:
        raise ValueError(
            f"this rank's sequence length {local_len} (= seq_len / cp) is not divisible by tp={dims.tp}: the "
            "indexer splits query rows across TP ranks; pad the sequence to a multiple of 2*cp*tp or change tp"
        )


# ---------------------------------------------------------------------------------------------- the steps
def project_indexer(indexer: LightningIndexer, inputs: DSAInputs, dims: ParallelDims,
                    keys: IndexKeys | None = None) -> IndexerRows:
    """Indexer queries of rows ``tp_rank::tp`` and keys of every local token, from *detached* inputs.

    ``keys``: the keys made (and their exchanges started) earlier from the same layer input; None: made here.
    """
    h, cq = inputs.indexer_h.detach(), inputs.indexer_cq.detach()
    rows = slice(dims.tp_rank, None, dims.tp)
    q, w = indexer.project_queries(cq[:, rows], h[:, rows])  # [B, Ll/tp, H_I, d_I], [B, Ll/tp, H_I]
    if keys is None:
        keys = IndexKeys(indexer, inputs.indexer_h, inputs.positions, dims)
    return IndexerRows(q=q, w=w, keys=keys, q_positions=inputs.positions[rows], k_positions=inputs.positions)


def select_topk(indexer: LightningIndexer, rows: IndexerRows, topk: int, dims: ParallelDims,
                cp_mode: str = "ring") -> torch.Tensor:
    """Top-k key indices [B, Ll/tp, k] int32 (global, −1 = empty) of the rows over every key of the sequence.

    Scores the FP8 (when enabled) indexer inputs; under CP the keys of all ranks are reached by
    :func:`dsa_dist.parallel.distributed_indexer_topk` in ``cp_mode``. Same result on every TP and CP layout.
    """
    q_index, weights = indexer.prepare_queries_for_topk(rows.q, rows.w, rows.q_positions)
    k_index, k_scale, prefetched = rows.keys.for_topk()
    if dims.cp == 1:
        return dispatch.lightning_indexer_topk(q_index, k_index, weights, topk, k_scale,
                                               q_positions=rows.q_positions, k_positions=rows.k_positions)[1]
    from dsa_dist.parallel import distributed_indexer_topk

    # The keys sit at this rank's zigzag positions (DSAInputs.positions are dims.local_positions), the
    # distributed top-k's default: passing None spares an all-gather of positions every layer. The shared tensor
    # proves it by identity; other tensors are compared on the device (no host sync): other positions would give
    # a silently wrong causal mask.
    local = dims.local_positions(rows.k_positions.numel(), rows.k_positions.device)
    if rows.k_positions is not local:
        assert_on_device((rows.k_positions == local).all(), lambda: "DSAInputs.positions under CP must be "
                         "dims.local_positions(local_len): the distributed top-k assumes the zigzag layout")
    return distributed_indexer_topk(q_index, weights, k_index, k_scale, topk, q_positions=rows.q_positions,
                                    group=dims.cp_group, mode=cp_mode, prefetched_keys=prefetched)[1]


def attend(q: torch.Tensor, k_full: torch.Tensor, v_full: torch.Tensor, *, softmax_scale: float,
           positions: torch.Tensor, topk: torch.Tensor | None = None, indices_checked: bool = False,
           position_blocks: tuple[tuple[int, int], ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of local queries over the whole sequence's KV: ``(out [B, Ll, H, d_v], lse [B, Ll, H])``.

    ``topk`` [B, Ll, k] (global key indices, −1 = empty): sparse attention over exactly those keys; None: dense
    causal attention (query at ``positions[i]`` sees keys ``0 .. positions[i]``) through
    :func:`dsa_dist.ops.dispatch.dense_attention` (fused on CUDA). ``position_blocks``: ``positions`` as runs
    ``((start, length), ...)`` (:meth:`ParallelDims.local_blocks`), which spares the fused dense attention a
    host read of ``positions``. ``indices_checked``: ``topk`` is in range by construction (from
    :func:`select_topk` or :func:`check_replay`), so the sparse attention skips its own range check (see
    :func:`dsa_dist.ops.sparse_attention`).
    """
    if topk is not None:
        return dispatch.sparse_attention(q, k_full, v_full, topk, softmax_scale, indices_checked=indices_checked)
    if position_blocks is not None:
        from dsa_dist.ops.position_blocks import positions_from_blocks

        # The fused kernel trusts the runs; one on-device comparison (no host sync) proves they are ``positions``.
        expected = positions_from_blocks(position_blocks, positions.device)
        if expected.shape != positions.shape:
            raise ValueError(f"position_blocks {position_blocks} cover {expected.numel()} positions, but positions "
                             f"has {positions.numel()}; pass dims.local_blocks(local_len)")
        assert_on_device((expected == positions).all(), lambda: f"position_blocks {position_blocks} do not "
                         "describe positions; pass dims.local_blocks(local_len) for dims.local_positions(local_len)")
        return dispatch.dense_attention(q, k_full, v_full, softmax_scale, q_blocks=position_blocks)
    k_positions = torch.arange(k_full.shape[1], device=q.device)
    return dispatch.dense_attention(q, k_full, v_full, softmax_scale, q_positions=positions,
                                    k_positions=k_positions)


def attend_with_sparse_kl(indexer: LightningIndexer, rows: IndexerRows, q: torch.Tensor, k_full: torch.Tensor,
                          v_full: torch.Tensor, topk: torch.Tensor, *, softmax_scale: float, dims: ParallelDims
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sparse attention with the sparse KL fused into its backward: ``(out, lse, kl_proxy, kl_value)``.

    Same attention and KL gradient as :func:`attend` + :func:`kl_target` + :func:`indexer_kl` (sparse), but the
    KL's target p_attn comes from the attention backward's own P tiles
    (:func:`dsa_dist.ops.sparse_attention_with_indexer_kl`): ``kl_proxy`` (value 0) carries the gradient to the
    indexer, ``kl_value`` is filled by the backward. TP (supported; :func:`dsa_attention` uses it at tp == 1 only,
    see there): p_attn is a mean over *all* heads; each rank's backward sums its heads for all local rows and one
    all-reduce of those [B, Ll, k] partials over the TP group replaces the separate op's all-to-all of q (this
    rank's KL rows are then ``tp_rank::tp``, as in :func:`indexer_kl`).
    CP works as for :func:`attend`: ``topk`` holds global indices into the gathered ``k_full``; the index keys are
    gathered too. ``topk`` [B, Ll, k] (every local row) comes from our own top-k or a validated replay.
    """
    q_index, weights = indexer.prepare_queries_for_kl(rows.q, rows.w, rows.q_positions)
    k_index_full = rows.keys.kl_full()  # [B, L, d_I]
    return dispatch.sparse_attention_with_indexer_kl(q, k_full, v_full, topk, softmax_scale, q_index, k_index_full,
                                                     weights, None, indices_checked=True,
                                                     head_group=dims.tp_group if dims.tp > 1 else None)


@torch.no_grad()
def kl_target(q: torch.Tensor, k_full: torch.Tensor, lse: torch.Tensor, *, kv_heads_split: bool,
              dims: ParallelDims) -> KLTarget:
    """Queries, keys and lse of this rank's indexer rows with all heads (detached; one all-to-all under TP).

    ``kv_heads_split``: the keys are split over TP by head (GQA) and are gathered; the MLA latent is one head
    replicated on every rank.
    """
    k_t = all_heads(k_full.detach(), dims) if kv_heads_split else k_full.detach()
    return KLTarget(q=heads_to_rows(q.detach(), dims), k=k_t, lse=heads_to_rows(lse.detach(), dims))


def indexer_kl(indexer: LightningIndexer, rows: IndexerRows, target: KLTarget, *, softmax_scale: float,
               dims: ParallelDims, topk: torch.Tensor | None = None, indices_checked: bool = False) -> torch.Tensor:
    """Mean KL over this rank's rows (a scalar, differentiable in the indexer parameters only).

    ``topk`` [B, Ll/tp, k]: the sparse KL on the selected set (stage 2); None: the dense KL over every causal key
    (warm-up). The indexer side uses the FP8-fake-quantised scores the top-k ranked (straight-through).
    ``indices_checked``: ``topk`` is in range by construction (as in :func:`attend`).
    """
    q_index, weights = indexer.prepare_queries_for_kl(rows.q, rows.w, rows.q_positions)
    k_index_full = rows.keys.kl_full()  # [B, L, d_I]
    if topk is not None:
        return dispatch.indexer_kl_loss_sparse(target.q, target.k, q_index, k_index_full, weights,
                                               topk, attn_lse=target.lse, softmax_scale=softmax_scale,
                                               indices_checked=indices_checked)
    k_positions = torch.arange(k_index_full.shape[1], device=k_index_full.device)
    return dispatch.indexer_kl_loss_dense(target.q, target.k, q_index, k_index_full, weights,
                                          attn_lse=target.lse, softmax_scale=softmax_scale,
                                          q_positions=rows.q_positions, k_positions=k_positions)


@torch.no_grad()
def indexer_recall(target: KLTarget, topk: torch.Tensor, q_positions: torch.Tensor, *, softmax_scale: float,
                   n_rows: int) -> torch.Tensor:
    """Mean share of the head-averaged dense attention mass that falls on the top-k set ``topk`` [B, Ll/tp, k],
    over ``n_rows`` rows evenly spaced among this rank's rows (latest first: they have the most keys to choose)."""
    q, k = target.q, target.k
    b, lq, h, d = q.shape
    hkv = k.shape[2]
    # Rows lq-1 - floor(i·(lq-1)/(n-1)), i < n: distinct (the step is ≥ 1) and built on the device — no
    # unique(), whose data-dependent size would sync the host.
    n = min(n_rows, lq)
    sel = (lq - 1) - torch.arange(n, device=q.device) * (lq - 1) // max(n - 1, 1)
    qs = q[:, sel].float().reshape(b, sel.numel(), hkv, h // hkv, d)
    logits = torch.einsum("bngjd,bkgd->bngjk", qs, k.float()).flatten(2, 3) * softmax_scale  # [B, n, H, L]
    future = torch.arange(k.shape[1], device=q.device)[None, :] > q_positions[sel][:, None]  # [n, L]
    probs = torch.softmax(logits.masked_fill(future[None, :, None], float("-inf")), -1).mean(2)  # [B, n, L]
    idx = topk[:, sel].long()
    covered = probs.gather(-1, idx.clamp_min(0)) * (idx >= 0)
    return covered.sum(-1).mean()


def check_replay(indices: torch.Tensor, batch: int, positions: torch.Tensor, layer: int) -> torch.Tensor:
    """Validate replayed top-k indices [B, Ll, k] for this rank's tokens; returns them as int32.

    Every entry must be −1 or a causal global key index (``0 <= idx <= position``): the sparse attention trusts
    its indices, so a future key here would leak information silently.
    """
    where = f"replay_topk[{layer}]"
    if not isinstance(indices, torch.Tensor) or indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise ValueError(f"{where} must be an integer tensor [B, L_local, k], got "
                         f"{getattr(indices, 'dtype', type(indices).__name__)}")
    if indices.dim() != 3 or indices.shape[:2] != (batch, positions.numel()) or indices.shape[2] < 1:
        raise ValueError(f"{where} must have shape [B={batch}, L_local={positions.numel()}, k>=1], got "
                         f"{tuple(indices.shape)}; record it with begin_forward(record_topk=True) on the same batch")
    indices = indices.to(device=positions.device, dtype=torch.int32)
    ok = ((indices >= -1) & (indices <= positions[None, :, None])).all()
    # On the device (CUDA: an asynchronous assertion, no host sync; CPU: ValueError now).
    assert_on_device(ok, lambda: f"{where} holds indices that are neither -1 nor a causal key (0 <= index <= the "
                                 "query's global position); replay only indices recorded for these token positions")
    return indices


# ---------------------------------------------------------------------------------------------- composed
@dataclass(frozen=True)
class DSAPlan:
    """What one DSA attention forward runs, decided once per forward by :func:`plan_dsa_attention` (deciding
    twice is not possible: taking the kept selection of a recomputed layer removes it from the tracker)."""

    sparse: bool
    """Sparse attention over the top-k (else dense causal attention)."""
    kl_on: bool
    """The indexer KL is computed and recorded."""
    fused_kl: bool
    """The KL comes from the sparse attention's backward (:func:`attend_with_sparse_kl`)."""
    want_recall: bool
    """The recall of the selection is measured."""
    want_record: bool
    """The selected indices are recorded."""
    select: bool
    """The indexer's own top-k runs (no replayed or kept selection)."""
    replay: torch.Tensor | None
    """Replayed indices [B, Ll, k] (not yet validated)."""
    kept: torch.Tensor | None
    """This layer's first-forward selection (recompute)."""
    index_keys: IndexKeys | None
    """The index keys, their exchanges started (None when no indexer step runs)."""


def plan_dsa_attention(h: torch.Tensor, positions: torch.Tensor, *, indexer: LightningIndexer, dsa: DSAModelConfig,
                       runtime: DSARuntime, dims: ParallelDims, tracker: IndexerLossTracker | None,
                       layer: int) -> DSAPlan:
    """Decide this forward's steps from the layer input ``h`` [B, Ll, hidden] at ``positions`` [Ll], and make the
    index keys — under CP their all-gathers start here, so an attention calls this *before* its projections and
    passes the plan to :func:`dsa_attention` (the exchanges then overlap the projections).

    Sparse stage with the KL, grad enabled and tp == 1 (``runtime.fused_sparse_kl``, default on): the KL is the
    fused one. Its value is known only after the backward: in forward-only passes (no grad, and an input that needs
    none: evaluation, rollouts) the separate op computes it in the forward. A no-grad forward whose input needs
    grad is the first pass of a reentrant recompute that checkpoints this attention: the recomputed pass runs the
    fused op, so this one skips the separate KL (its record is replaced by the recomputed one). (A recompute region
    that starts before the input's projection sees an input without grad here: separate op.) Under TP the fused op
    would sum the target over the ranks' heads in another order than one rank does; measured in the GRPO TP=2 vs
    TP=1 test, that rounding change moved the KL (~1e-4, p ≈ softmax(I), so p·log(p/q) cancels) by 2e-4 relative
    and the second iteration's policy loss by 1.2 %. TP runs keep the separate op, whose target is computed as at
    tp == 1, so TP layouts reproduce tp == 1.
    """
    check_local_length(h.shape[1], dims)
    sparse = runtime.attention == "sparse"
    kl_on = runtime.indexer_kl and tracker is not None
    want_recall = tracker is not None and tracker.measure_recall
    want_record = tracker is not None and tracker.record_topk
    replay = tracker.replayed_topk(layer) if tracker is not None else None
    kept = tracker.kept_topk(layer) if tracker is not None else None  # own first-forward selection (recompute)
    if replay is not None and not sparse:
        raise ValueError(f"replay_topk was given but layer {layer} runs dense attention; replaying indices needs "
                         "a model built with DSARuntime(attention='sparse')")
    select = replay is None and kept is None and (sparse or want_recall or want_record)
    training = torch.is_grad_enabled() or h.requires_grad
    fused_kl = kl_on and sparse and runtime.fused_sparse_kl and training and dims.tp == 1
    keys = None
    if kl_on or want_recall or select:
        keys = IndexKeys(indexer, h, positions, dims, topk_mode=dsa.indexer.cp_topk_mode if select else None,
                         kl=kl_on)
    return DSAPlan(sparse=sparse, kl_on=kl_on, fused_kl=fused_kl, want_recall=want_recall, want_record=want_record,
                   select=select, replay=replay, kept=kept, index_keys=keys)


def dsa_attention(inputs: DSAInputs, *, indexer: LightningIndexer, dsa: DSAModelConfig, runtime: DSARuntime,
                  dims: ParallelDims, tracker: IndexerLossTracker | None, layer: int,
                  plan: DSAPlan | None = None) -> torch.Tensor:
    """One DSA attention on this rank's tokens and heads: the steps above as ``runtime`` and ``tracker`` ask.

    ``plan``: from :func:`plan_dsa_attention` on ``inputs.indexer_h`` / ``inputs.positions`` (made before the
    projections, to overlap the index keys' exchange with them); None: planned here. The fused or separate KL is
    chosen there (see its docstring).

    Returns the attention output [B, Ll, H/tp, d_v]. Records this layer's KL (``runtime.indexer_kl``), recall
    (``measure_recall``) and selected indices (``record_topk``) in ``tracker``; replays its indices when given.
    """
    if plan is None:
        plan = plan_dsa_attention(inputs.indexer_h, inputs.positions, indexer=indexer, dsa=dsa, runtime=runtime,
                                  dims=dims, tracker=tracker, layer=layer)
    q, positions, scale, ix = inputs.q, inputs.positions, dsa.softmax_scale, dsa.indexer
    batch, local_len = q.shape[:2]
    if plan.index_keys is not None and plan.index_keys.raw.shape[1] != local_len:
        raise ValueError(f"plan was made for {plan.index_keys.raw.shape[1]} local tokens, inputs have {local_len}; "
                         "plan with the same layer input as the projections")

    kv = PendingKV(inputs, dims)  # the transfer overlaps the indexer's scoring
    rows = project_indexer(indexer, inputs, dims, plan.index_keys) if plan.index_keys is not None else None
    topk_rows = topk_all = None  # [B, Ll/tp, k] this rank's indexer rows / [B, Ll, k] every local row
    if plan.kept is not None:  # selected (or validated) by this layer in its first forward: no second check
        topk_all = plan.kept
        topk_rows = topk_all[:, dims.tp_rank::dims.tp]
    elif plan.replay is not None:
        topk_all = check_replay(plan.replay, batch, positions, layer)
        topk_rows = topk_all[:, dims.tp_rank::dims.tp]
    elif plan.select:
        topk_rows = select_topk(indexer, rows, ix.topk, dims, ix.cp_topk_mode)
        if plan.sparse or plan.want_record:
            topk_all = rows_to_all(topk_rows, dims)  # same on every TP rank
    if plan.want_record:
        tracker.record_selected(layer, topk_all)

    k_full, v_full = kv.wait()
    kl_value = None
    # topk_all comes from our own top-k or a validated replay: in range by construction, no second check.
    # DSAInputs.positions are this rank's dims.local_positions (as every producer builds them): their runs are
    # known on the host, so the dense path needs no host read of positions.
    if plan.fused_kl:
        out, lse, kl, kl_value = attend_with_sparse_kl(indexer, rows, q, k_full, v_full, topk_all,
                                                       softmax_scale=scale, dims=dims)
    else:
        out, lse = attend(q, k_full, v_full, softmax_scale=scale, positions=positions,
                          topk=topk_all if plan.sparse else None, indices_checked=True,
                          position_blocks=None if plan.sparse else dims.local_blocks(local_len))
    if not (plan.kl_on or plan.want_recall):
        return out
    target = kl_target(q, k_full, lse, kv_heads_split=inputs.v is not None, dims=dims) if (
        plan.want_recall or not plan.fused_kl) else None
    if plan.want_recall:
        tracker.record_recall(layer, indexer_recall(target, topk_rows, rows.q_positions, softmax_scale=scale,
                                                    n_rows=ix.recall_rows))
    if not plan.kl_on:
        return out
    if not plan.fused_kl:
        kl = indexer_kl(indexer, rows, target, softmax_scale=scale, dims=dims,
                        topk=topk_rows if plan.sparse else None, indices_checked=True)
    tracker.record(layer, kl, value=kl_value)
    if tracker.attach_coeff is not None:
        out = attach_loss(out, kl, tracker.attach_weight)
    return out
