"""Fused dense causal attention with its log-sum-exp: PyTorch's flash / memory-efficient kernels (docs/design.md).

Same contract as the reference :func:`dsa_dist.ops.dense_attention` — ``(out [B, Lq, H, d_v] in q's dtype,
lse [B, Lq, H] float32, natural log)`` — and the op :mod:`dsa_dist.ops.dispatch` runs for CUDA tensors. It is not
a kernel of ours but a thin wrapper over ATen's fused attention ops, which already return the lse the indexer KL
needs and have autograd formulas; so it lives next to the reference in ``dsa_dist/ops`` rather than in
``kernels/`` (home of our Triton kernels).

How the causal mask is met. Keys sit at positions ``0 .. Lk−1``; queries are runs of consecutive global
positions (:mod:`dsa_dist.ops.position_blocks`; zigzag CP gives two runs per rank). A run at ``[o, o+n)`` sees
keys ``[0, o+n)``: the keys are sliced to that prefix and the run attends with *bottom-right* aligned causal
masking (query i of the run sees keys ``0 .. o+i``). Each run is one kernel call; outputs are concatenated — no
lse merging, so the lse needs no gradient (ATen's lse outputs have none; the reference's lse has one, but the
KL target detaches it). Queries past the last key see every key: a non-causal call. Every query sees key 0, so
no row is empty (the reference's "lse −inf, out 0" rows cannot occur; positions < 0 run the reference).

Kernels, per call (:func:`select_kernel`):

- ``flash`` — ``aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, return_debug_mask,
  scale=)`` on [B, H, L, d]: fp16/bf16, d_qk = d_v ≤ 256, a multiple of 8. ``is_causal`` with Lq < Lk is
  bottom-right for this op (what ``torch.nn.attention.bias.causal_lower_right`` relies on). GQA natively (Hkv
  divides H; ``enable_gqa`` of SDPA calls it with the smaller K/V). lse [B, H, Lq].
- ``efficient`` — ``aten._efficient_attention_forward(q, k, v, bias, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
  max_seqlen_k, dropout_p, custom_mask_type, compute_log_sumexp, scale=)`` on [B, L, H, d], with
  ``custom_mask_type = CausalVariant.LOWER_RIGHT`` (2): any d_qk, d_v (the absorbed MLA latent, 288/256 in the
  ``small`` preset, 576/512 in V3.2), fp32 too. Forward and backward check equal head counts, so K/V heads are
  expanded to H: by default a stride-0 ``expand`` view (:data:`EFFICIENT_KV_EXPAND` = ``"view"``, no copy; the
  kernel reads through per-head strides and its backward allocates fresh contiguous dK/dV, which autograd sums
  over the group), or a materialised copy (``"copy"``, kept for backward). lse [B, H, ceil(Lq/32)·32], sliced
  to Lq.
- ``cpu`` — ``aten._scaled_dot_product_flash_attention_for_cpu`` (top-left ``is_causal``, so a lower-right
  additive mask when Lq < Lk; d_qk = d_v, so the shorter side is zero-padded): lets the CPU tests (and
  ``DSA_BACKEND=triton`` with the interpreter) run this whole wrapper, autograd included.

float64 inputs (tests) have no fused kernel and run the reference. ``q_positions``/``k_positions`` given as
tensors are read on the host (one synchronisation per call) to find the runs; keys at positions other than
``arange(Lk)`` run the reference (logged once). Training passes ``q_blocks`` and never synchronises.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalVariant

from dsa_dist.ops._checks import check_attention_qkv
from dsa_dist.ops.dense_attention import dense_attention as reference_dense_attention
from dsa_dist.ops.position_blocks import PositionBlocks, blocks_from_positions, check_blocks

Kernel = Literal["flash", "efficient", "cpu"]
EFFICIENT_KV_EXPAND: Literal["view", "copy"] = "view"
"""How the ``efficient`` kernel gets H key/value heads from Hkv < H: a stride-0 view or a copy (module docstring)."""
_log = logging.getLogger(__name__)
_warned: set[str] = set()


@dataclass(frozen=True)
class Segment:
    """One kernel call: local query rows ``[row, row+length)`` over keys ``[0, key_end)``."""

    row: int
    """First local query row."""
    length: int
    """Number of query rows."""
    key_end: int
    """Keys ``0 .. key_end−1`` are passed to the kernel."""
    causal: bool
    """Bottom-right causal (row i sees keys ``0 .. key_end−length+i``); False: every passed key is visible."""


def plan_segments(blocks: PositionBlocks, num_keys: int) -> tuple[Segment, ...]:
    """The kernel calls that compute causal attention of query runs ``blocks`` over keys ``0 .. num_keys−1``."""
    if num_keys < 1:
        raise ValueError(f"k must hold at least one key (dim 1), got {num_keys}")
    segments, row = [], 0
    for start, length in blocks:
        inside = min(max(num_keys - start, 0), length)  # queries at positions < num_keys: causal over a prefix
        if inside:
            segments.append(Segment(row, inside, start + inside, True))
        if length - inside:  # positions >= num_keys: every key is in their past
            segments.append(Segment(row + inside, length - inside, num_keys, False))
        row += length
    return tuple(segments)


def select_kernel(device: torch.device, dtype: torch.dtype, d_qk: int, d_v: int) -> Kernel:
    """The ATen kernel for these inputs (see the module docstring for each kernel's limits)."""
    if device.type != "cuda":
        return "cpu"
    # Flash (FlashAttention-2 in ATen): one head size for q, k and v, a multiple of 8, at most 256.
    if dtype in (torch.float16, torch.bfloat16) and d_qk == d_v and d_qk <= 256 and d_qk % 8 == 0:
        return "flash"
    return "efficient"


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _expand_heads(x: torch.Tensor, heads: int, copy: bool = True) -> torch.Tensor:
    """[B, L, Hkv, d] → [B, L, H, d], query head h reading KV head h // (H/Hkv) (the reference's grouping).

    ``copy=False``: a view when possible — MQA (Hkv = 1) is a stride-0 ``expand``; GQA groups need a copy.
    """
    b, n, hkv, d = x.shape
    if hkv == heads:
        return x
    if not copy and hkv == 1:
        return x.expand(b, n, heads, d)
    return x[:, :, :, None].expand(b, n, hkv, heads // hkv, d).reshape(b, n, heads, d)


def _lower_right_mask(n: int, keys: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    rows = torch.arange(n, device=device)[:, None] + (keys - n)
    visible = torch.arange(keys, device=device)[None, :] <= rows
    return torch.zeros(n, keys, dtype=dtype, device=device).masked_fill(~visible, float("-inf"))


def run_segment(kernel: Kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused call: ``q`` [B, n, H, d_qk], ``k``/``v`` [B, m, Hkv, ·] (n ≤ m when causal) → ``(out, lse)``."""
    h, d_v = q.shape[2], v.shape[-1]
    if kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 0.0, causal, False, scale=scale)[:2]
        return out.transpose(1, 2), lse.transpose(1, 2)
    if kernel == "efficient":
        mask_type = int(CausalVariant.LOWER_RIGHT) if causal else 0
        copy = EFFICIENT_KV_EXPAND == "copy"
        out, lse = torch.ops.aten._efficient_attention_forward(
            q, _expand_heads(k, h, copy), _expand_heads(v, h, copy), bias=None, cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, dropout_p=0.0, custom_mask_type=mask_type,
            compute_log_sumexp=True, scale=scale)[:2]
        return out, lse[:, :, : q.shape[1]].transpose(1, 2)  # lse rows padded to a multiple of 32 (kAlignLSE)
    width = max(q.shape[-1], d_v)  # the CPU kernel wants one head size: zero columns change no score
    qt, kt, vt = (_pad_last(x, width).transpose(1, 2) for x in (q, _expand_heads(k, h), _expand_heads(v, h)))
    n, m = q.shape[1], k.shape[1]
    mask = _lower_right_mask(n, m, q.dtype, q.device) if causal and n < m else None
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qt, kt, vt, 0.0, causal and n == m, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)[..., :d_v], lse.transpose(1, 2)


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message)


def _resolve_blocks(q_positions: torch.Tensor | None, k_positions: torch.Tensor | None,
                    q_blocks: PositionBlocks | None, lq: int, lk: int) -> PositionBlocks | None:
    """The query runs over keys at ``arange(Lk)``, or None when only the reference can compute this layout."""
    if q_blocks is not None:
        if q_positions is not None or k_positions is not None:
            raise ValueError("q_blocks replaces q_positions (keys at 0 .. Lk-1): pass q_blocks alone, or "
                             "q_positions/k_positions without q_blocks")
        return check_blocks("q_blocks", q_blocks, lq)
    if q_positions is None and k_positions is None:
        return ((0, lq),)
    # A host read of the positions: fine for tests and tools; the training path passes q_blocks instead.
    if k_positions is not None and not torch.equal(k_positions.cpu().long(), torch.arange(lk)):
        return None
    q_host = list(range(lq)) if q_positions is None else q_positions.cpu().tolist()
    if min(q_host) < 0:
        return None
    return blocks_from_positions(q_host)


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    softmax_scale: float | None = None,
    *,
    q_positions: torch.Tensor | None = None,
    k_positions: torch.Tensor | None = None,
    q_blocks: PositionBlocks | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention through PyTorch's fused kernels; arguments and result as :func:`dsa_dist.ops.dense_attention`.

    ``q_blocks`` ``((start, length), ...)``: the queries' global positions as runs, keys at ``0 .. Lk−1`` (the
    synchronisation-free form of ``q_positions``). Returns ``(out [B, Lq, H, d_v], lse [B, Lq, H] float32)``.
    """
    check_attention_qkv(q, k, v)
    if q.dtype == torch.float64:  # no fused float64 kernel; the reference is exact
        return reference_dense_attention(q, k, v, softmax_scale, q_positions=q_positions,
                                         k_positions=k_positions, q_blocks=q_blocks)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype for the fused attention, got {q.dtype}, {k.dtype}, "
                        f"{v.dtype}; cast them (the reference op accepts mixed dtypes)")
    for name, t in (("q_positions", q_positions), ("k_positions", k_positions)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, expected {q.device}")
    lq, lk = q.shape[1], k.shape[1]
    if lq == 0:  # nothing to attend; shapes as the contract says
        return q.new_zeros(*q.shape[:3], v.shape[-1]), torch.zeros(q.shape[:3], device=q.device)
    blocks = _resolve_blocks(q_positions, k_positions, q_blocks, lq, lk)
    if blocks is None:
        _warn_once("layout", "fused dense attention: keys not at arange(Lk) or negative query positions; running "
                             "the PyTorch reference for this layout (slow on GPU)")
        return reference_dense_attention(q, k, v, softmax_scale, q_positions=q_positions, k_positions=k_positions)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    kernel = select_kernel(q.device, q.dtype, q.shape[-1], v.shape[-1])
    outs, lses = [], []
    for seg in plan_segments(blocks, lk):
        out, lse = run_segment(kernel, q[:, seg.row: seg.row + seg.length], k[:, : seg.key_end],
                               v[:, : seg.key_end], scale, seg.causal)
        outs.append(out)
        lses.append(lse)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    lse = lses[0] if len(lses) == 1 else torch.cat(lses, 1)
    # [B, Lq, H] contiguous (flash's lse arrives as a transposed view): what the KL kernels expect.
    return out.to(q.dtype), lse.float().contiguous()
