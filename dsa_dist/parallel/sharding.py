"""Zigzag sequence sharding and the differentiable sequence all-gather (docs/design.md#context-parallelism).

The sequence of ``L`` tokens is cut into ``2·CP`` equal chunks; CP rank ``r`` holds chunks ``r`` and
``2·CP − 1 − r`` (Megatron-Core's ``get_batch_on_this_cp_rank`` convention). Causal work per query grows with
its position, so pairing an early chunk with a late one gives every rank the same indexer and dense-attention
cost. A rank's shard is stored in ascending position order: ``[chunk r, chunk 2CP−1−r]``.

"Global order" is the order of the unsharded sequence; :func:`all_gather_sequence` returns tensors in global
order, so a global key index is simply a row of the gathered tensor (= the token's position when positions are
``arange(L)``). Its backward sums every rank's gradient for a row and hands the sum to the row's owner
(reduce-scatter in fp32, cast back): that is how dKV and d(index keys) reach their owners.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from dsa_dist.parallel._comm import (
    PendingReduceScatter,
    ReduceScatterMethod,
    all_gather_stacked,
    group_size_rank,
    reduce_scatter_stacked,
)


def check_cp_config(seq_len: int, cp_size: int) -> None:
    """Raise ``ValueError`` unless a sequence of ``seq_len`` tokens can be zigzag-sharded over ``cp_size`` ranks.

    CP=1 accepts any length; CP>1 needs ``seq_len`` divisible by ``2·cp_size`` (each rank holds two chunks).
    """
    if isinstance(cp_size, bool) or not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"context parallel size cp_size must be a positive int, got {cp_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if cp_size > 1 and seq_len % (2 * cp_size):
        multiple = 2 * cp_size
        padded = -(-seq_len // multiple) * multiple
        divisors = [c for c in range(1, cp_size + 1) if seq_len % (2 * c) == 0 or c == 1]
        raise ValueError(
            f"seq_len={seq_len} is not divisible by 2*cp={multiple}: zigzag context parallelism splits the "
            f"sequence into 2*cp equal chunks. Fix: pad the sequence to {padded} tokens, or use a context "
            f"parallel size cp with seq_len % (2*cp) == 0 (cp <= {cp_size} that fit: {divisors})"
        )


def _check_rank(cp_size: int, cp_rank: int) -> None:
    if isinstance(cp_rank, bool) or not isinstance(cp_rank, int) or not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank must be an int in [0, {cp_size}), got {cp_rank!r}")


def zigzag_positions(
    seq_len: int, cp_size: int, cp_rank: int, device: torch.device | str | None = None
) -> torch.Tensor:
    """Global positions (= global rows) of the tokens rank ``cp_rank`` holds: int64 [seq_len // cp_size], ascending."""
    return torch.cat([torch.arange(start, start + n, device=device)
                      for start, n in zigzag_blocks(seq_len, cp_size, cp_rank)])


def zigzag_blocks(seq_len: int, cp_size: int, cp_rank: int) -> tuple[tuple[int, int], ...]:
    """:func:`zigzag_positions` as runs ``((start, length), ...)`` of Python ints (no device tensor to read)."""
    check_cp_config(seq_len, cp_size)
    _check_rank(cp_size, cp_rank)
    if cp_size == 1:
        return ((0, seq_len),)
    chunk = seq_len // (2 * cp_size)
    late = 2 * cp_size - 1 - cp_rank
    if late == cp_rank + 1:  # the two chunks touch (last rank): one run
        return ((cp_rank * chunk, 2 * chunk),)
    return ((cp_rank * chunk, chunk), (late * chunk, chunk))


def zigzag_split(x: torch.Tensor, seq_dim: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """This rank's shard of a full-sequence tensor: chunks ``r`` and ``2CP−1−r`` of dim ``seq_dim``, concatenated.

    Differentiable (an ``index_select``); use it for tokens, labels, loss masks and position ids alike.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    seq_dim = seq_dim % x.dim()
    check_cp_config(x.shape[seq_dim], cp_size)
    _check_rank(cp_size, cp_rank)
    if cp_size == 1:
        return x
    # two narrow views and one cat: no index tensor built from Python data (a blocking host-to-device copy)
    chunk = x.shape[seq_dim] // (2 * cp_size)
    late = 2 * cp_size - 1 - cp_rank
    return torch.cat([x.narrow(seq_dim, cp_rank * chunk, chunk), x.narrow(seq_dim, late * chunk, chunk)], seq_dim)


@functools.lru_cache(maxsize=64)
def _chunk_permutation(cp_size: int, to_global: bool, device: torch.device) -> torch.Tensor:
    """Chunk order between rank-major concatenation of shards and global order (2·CP chunks).

    Rank-major slot ``2r`` holds global chunk ``r`` and slot ``2r+1`` holds chunk ``2CP−1−r``.
    ``to_global``: entry c = the rank-major slot of global chunk c; otherwise entry s = the global chunk of slot s.
    Built on the device from ``arange`` (``torch.tensor(list, device=cuda)`` would be a blocking copy on every
    sequence gather) and cached per (CP, direction, device): the tensor is shared, read only.
    """
    with torch.inference_mode(False):  # a normal tensor even when first built in inference mode (autograd saves it)
        i = torch.arange(2 * cp_size, device=device)
        if to_global:  # chunk c < CP sits in slot 2c; chunk c >= CP in slot 2(2CP-1-c)+1
            return torch.where(i < cp_size, 2 * i, 2 * (2 * cp_size - 1 - i) + 1)
        return torch.where(i % 2 == 0, i // 2, 2 * cp_size - 1 - i // 2)  # slot s: chunk s/2 or 2CP-1-(s-1)/2


def _reorder_chunks(x: torch.Tensor, seq_dim: int, cp_size: int, to_global: bool) -> torch.Tensor:
    if cp_size == 1:
        return x
    seq_dim = seq_dim % x.dim()
    n = x.shape[seq_dim]
    chunks = x.unflatten(seq_dim, (2 * cp_size, n // (2 * cp_size)))
    order = _chunk_permutation(cp_size, to_global, x.device)
    return chunks.index_select(seq_dim, order).flatten(seq_dim, seq_dim + 1)


def rank_major_to_global(x: torch.Tensor, seq_dim: int, cp_size: int) -> torch.Tensor:
    """Reorder the concatenated zigzag shards of all ranks (rank 0's first) along ``seq_dim`` to global order."""
    return _reorder_chunks(x, seq_dim, cp_size, to_global=True)


def global_to_rank_major(x: torch.Tensor, seq_dim: int, cp_size: int) -> torch.Tensor:
    """Inverse of :func:`rank_major_to_global`."""
    return _reorder_chunks(x, seq_dim, cp_size, to_global=False)


def _global_to_rank_major_as(x: torch.Tensor, seq_dim: int, cp_size: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`global_to_rank_major` and a cast to ``dtype`` in one pass: one output buffer, filled chunk by chunk.

    The gradient of a gathered sequence is [B, L, ...] over the *full* L; reordering then casting (or the reverse)
    would hold two full-length copies at once (V3.2 dKV at 512K tokens: 2 × 1.1 GiB fp32).
    """
    if cp_size == 1:
        return x.to(dtype)
    seq_dim = seq_dim % x.dim()
    n = x.shape[seq_dim] // (2 * cp_size)
    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    for slot in range(2 * cp_size):  # slot 2r: global chunk r; slot 2r+1: global chunk 2CP-1-r
        chunk = slot // 2 if slot % 2 == 0 else 2 * cp_size - 1 - slot // 2
        out.narrow(seq_dim, slot * n, n).copy_(x.narrow(seq_dim, chunk * n, n))
    return out


def _stacked_to_global(stacked: torch.Tensor, seq_dim: int, cp_size: int) -> torch.Tensor:
    # stacked: [CP, *shard_shape] -> rank-major along seq_dim -> global order
    rank_major = stacked.movedim(0, seq_dim).flatten(seq_dim, seq_dim + 1)
    return rank_major_to_global(rank_major, seq_dim, cp_size).contiguous()


class _DeferredReduceScatter:
    """The backward reduce-scatter of a gathered shard ``x``, waited for only where ``x``'s gradient is consumed.

    The gather's backward starts the reduce-scatter and gives autograd a zero gradient for ``x``; a pre-hook on
    ``x.grad_fn`` (the node that consumes that gradient) waits for the collective and adds its result to whatever
    reached that node (the zeros, plus the gradient of any other use of ``x``). Autograd runs the ready nodes
    created latest first, so every backward node of work created after ``x`` in the forward (in a DSA layer: the
    other projections, the indexer's queries) is launched before the wait, and the transfer overlaps it instead of
    stalling the compute stream right after the attention backward. Only for shards produced by an autograd op: a
    leaf has no node to hook, and a caller asking autograd for ``x``'s own gradient
    (``torch.autograd.grad(..., inputs=x)``) would read it before the hook runs — so this is opt-in
    (``defer_backward``) and the model uses it for its internal tensors only.
    """

    def __init__(self, x: torch.Tensor) -> None:
        self._slot = x.output_nr
        self._pending: tuple[PendingReduceScatter, torch.dtype] | None = None
        x.grad_fn.register_prehook(self._add_when_consumed)

    @staticmethod
    def applies_to(x: torch.Tensor) -> bool:
        """Whether ``x``'s gradient goes to a node that can be hooked (grad recorded, ``x`` not a leaf)."""
        return torch.is_grad_enabled() and x.requires_grad and x.grad_fn is not None

    def start(self, pending: PendingReduceScatter, dtype: torch.dtype) -> None:
        self._pending = (pending, dtype)

    def _add_when_consumed(self, grad_outputs: tuple) -> tuple | None:
        if self._pending is None:  # this backward did not reach the gather (its output took no gradient)
            return None
        pending, dtype = self._pending
        self._pending = None
        local = pending.wait().to(dtype)
        grads = list(grad_outputs)
        grads[self._slot] = grads[self._slot] + local
        return tuple(grads)


class _AllGatherSequence(torch.autograd.Function):
    """Forward: zigzag shards -> full sequence in global order. Backward: fp32 reduce-scatter to the owners."""

    @staticmethod
    def forward(ctx, x, seq_dim, group, stacked, rs_method, deferred):  # noqa: D102 - see class docstring
        size, _ = group_size_rank(group)
        ctx.seq_dim, ctx.group, ctx.size, ctx.dtype, ctx.rs_method = seq_dim, group, size, x.dtype, rs_method
        ctx.deferred = deferred
        if stacked is None:
            stacked, _ = all_gather_stacked(x, group)
        return _stacked_to_global(stacked, seq_dim, size)

    @staticmethod
    def backward(ctx, grad):  # noqa: D102
        seq_dim, size = ctx.seq_dim, ctx.size
        # Every rank holds a gradient for every row (from its own queries); the owner needs the sum, accumulated
        # in fp32 (or wider, for float64 tests) and cast back to the shard's dtype afterwards.
        acc = torch.promote_types(grad.dtype, torch.float32)
        rank_major = _global_to_rank_major_as(grad, seq_dim, size, acc)
        stacked = rank_major.unflatten(seq_dim, (size, rank_major.shape[seq_dim] // size)).movedim(seq_dim, 0)
        if ctx.deferred is not None:
            pending = reduce_scatter_stacked(stacked, ctx.group, method=ctx.rs_method, async_op=True)
            ctx.deferred.start(pending, ctx.dtype)
            # Autograd lets a pre-hook change a gradient but not create a missing one: hand it zeros to add to.
            return torch.zeros(stacked.shape[1:], dtype=ctx.dtype, device=grad.device), None, None, None, None, None
        local = reduce_scatter_stacked(stacked, ctx.group, method=ctx.rs_method)
        return local.to(ctx.dtype), None, None, None, None, None


class PendingSequenceGather:
    """An all-gather in flight (``all_gather_sequence(..., async_op=True)``); :meth:`wait` returns the result.

    Lets the KV all-gather run while the indexer scores (docs/design.md#context-parallelism): start it, run the
    top-k, then wait.
    """

    def __init__(self, x: torch.Tensor, seq_dim: int, group: dist.ProcessGroup | None,
                 rs_method: ReduceScatterMethod, defer_backward: bool = False):
        self._x, self._seq_dim, self._group, self._rs_method = x, seq_dim, group, rs_method
        self._deferred = _DeferredReduceScatter(x) if defer_backward and _DeferredReduceScatter.applies_to(x) \
            else None
        self._stacked, self._work = all_gather_stacked(x.detach(), group, async_op=True)
        self._result: torch.Tensor | None = None

    def wait(self) -> torch.Tensor:
        """Block until the gather is done; returns the full sequence in global order (autograd-connected)."""
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = _AllGatherSequence.apply(self._x, self._seq_dim, self._group, self._stacked,
                                                    self._rs_method, self._deferred)
            self._stacked = None
        return self._result


def all_gather_sequence(
    x: torch.Tensor,
    seq_dim: int,
    group: dist.ProcessGroup | None = None,
    *,
    async_op: bool = False,
    reduce_scatter_method: ReduceScatterMethod = "auto",
    defer_backward: bool = False,
) -> torch.Tensor | PendingSequenceGather:
    """All-gather the zigzag shards of ``x`` along ``seq_dim`` into the full sequence in global order.

    Args:
        x: this rank's shard (length ``L / CP`` along ``seq_dim``), any dtype (FP8 travels as bytes).
        seq_dim: the sequence dim (1 for the batch-first ``[B, L, ...]`` layout of dsa_dist.ops).
        group: the CP process group (Megatron: ``parallel_state.get_context_parallel_group()``); None = world.
        async_op: return a :class:`PendingSequenceGather` whose ``wait()`` gives the tensor, so the transfer
            overlaps whatever runs in between.
        reduce_scatter_method: backward collective ("auto": reduce-scatter where the backend has it,
            else all-reduce + slice; the two are interchangeable).
        defer_backward: (with ``async_op``) the backward reduce-scatter is waited for only where ``x``'s
            gradient is consumed, so it overlaps the backward of everything computed after ``x`` (see
            :class:`_DeferredReduceScatter` for when that is safe); ignored for a leaf ``x``.

    Returns:
        ``[..., L, ...]`` in global order. Backward: the gradient of every row is summed over the ranks in
        fp32 and returned (cast to x's dtype) to the rank that owns the row.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    seq_dim = seq_dim % x.dim()
    size, _ = group_size_rank(group)
    check_cp_config(x.shape[seq_dim] * size, size)
    if defer_backward and not async_op:
        raise ValueError("defer_backward=True needs async_op=True (the gather is started, then waited for)")
    if async_op:
        return PendingSequenceGather(x, seq_dim, group, reduce_scatter_method, defer_backward)
    if size == 1:
        return x
    return _AllGatherSequence.apply(x, seq_dim, group, None, reduce_scatter_method, None)
