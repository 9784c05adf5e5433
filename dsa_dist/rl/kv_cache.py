"""KV cache and FP8 index-key cache for DSA decoding (docs/design.md §1 "GRPO": rollouts decode with the model's
own sparse attention over a KV cache plus an FP8 index-key cache).

Per layer and per sequence the cache keeps, for every position written so far:

- the attention keys/values the core attention reads: MLA keeps **one latent row per token**
  ``[c_kv, rope(k_rope)]`` (kv_lora + rope dims, e.g. 576), whose first ``kv_lora`` dims are also the values
  (absorbed/MQA mode), so no separate value tensor exists; GQA keeps K and V of this rank's KV heads;
- the lightning-indexer key exactly as top-k scores it: after rope, Hadamard and FP8 quantisation, i.e. the e4m3
  bytes (d_I per token) and the fp32 per-key scale (4 bytes). Queries are quantised per token, so scoring a new
  query against these cached keys gives the same scores as the full-sequence indexer.

Positions and context parallelism — :class:`CacheLayout` maps each global position ``p`` of a sequence to the CP
rank that stores it and its row there. The prompt prefix ``[0, prefill_len)`` is zigzag-sharded (prefill runs the
model's own CP forward, so each rank caches the rows it computed); generated positions are dealt round-robin
(``p - prefill_len`` mod CP) so the cache and the decode work grow evenly on every rank. A rank's rows are in
ascending position order, which keeps its local top-k tie-break (lowest row) equal to the global one (lowest
position) — the property :func:`dsa_dist.parallel.candidate_topk` needs. The layout is shared by all sequences of
a batch: sequence ``b`` at position ``p_b`` may read rows at positions ``<= p_b`` only, and every such row has been
written for ``b`` (prompt rows by prefill, later rows by the decode steps that produced them).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from dsa_dist.ops._checks import assert_on_device
from dsa_dist.ops.topk import INVALID_INDEX


class CacheLayout:
    """Which CP rank holds each position ``[0, capacity)`` and at which local row (same for every sequence).

    Args:
        prefill_len: positions written by the (zigzag CP-sharded) prefill; a multiple of ``2 * cp_size`` when
            ``cp_size > 1`` (0 allowed: nothing prefilled).
        decode_len: positions written by decode steps after the prefill (at least 1).
        cp_size / cp_rank: the context-parallel group size and this rank's index in it.
    """

    def __init__(self, prefill_len: int, decode_len: int, *, cp_size: int = 1, cp_rank: int = 0,
                 device: torch.device | str | None = None) -> None:
        from dsa_dist.parallel import check_cp_config, zigzag_positions

        if prefill_len < 0 or decode_len < 1:
            raise ValueError(f"CacheLayout needs prefill_len >= 0 and decode_len >= 1, got {prefill_len}, "
                             f"{decode_len}")
        if prefill_len:
            check_cp_config(prefill_len, cp_size)
        # Every rank gets the same number of decode rows (decode_len rounded up to a multiple of CP), so no rank
        # is ever without a row and the per-rank cache shapes match.
        decode_rows = -(-decode_len // cp_size)
        self.prefill_len, self.cp_size, self.cp_rank = prefill_len, cp_size, cp_rank
        self.capacity = prefill_len + decode_rows * cp_size
        owner = torch.empty(self.capacity, dtype=torch.long)
        row = torch.empty(self.capacity, dtype=torch.long)
        if prefill_len:
            for r in range(cp_size):
                mine = zigzag_positions(prefill_len, cp_size, r)
                owner[mine] = r
                row[mine] = torch.arange(mine.numel())
        gen = torch.arange(prefill_len, self.capacity)
        owner[gen] = (gen - prefill_len) % cp_size
        row[gen] = prefill_len // cp_size + (gen - prefill_len) // cp_size
        self.owner = owner.to(device)  # [capacity] CP rank holding each position
        self.row = row.to(device)  # [capacity] row on that rank
        host_positions = (owner == cp_rank).nonzero().squeeze(1)  # built on the host: no device sync
        self.positions = host_positions.to(device)  # [rows] ascending, local row order
        self.rows = host_positions.numel()
        # A host copy for visible_rows, so that sizing a decode step's reads never waits for the device.
        self._host_positions: list[int] = host_positions.tolist()

    def locate(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``positions`` [B, n] → (``mine`` [B, n] bool: stored on this rank, ``rows`` [B, n] local rows)."""
        if positions.numel():  # checked on the device (CUDA: an async assertion, no host sync; CPU: raises now)
            top = positions.max()
            assert_on_device(top < self.capacity,
                             lambda: f"position {int(top)} is beyond the cache capacity {self.capacity}; "
                                     "allocate the cache with a larger max_new_tokens")
        return self.owner[positions] == self.cp_rank, self.row[positions]

    def visible_rows(self, max_position: int) -> int:
        """Number of local rows (a prefix: rows are in position order) with position ≤ ``max_position`` (a host
        int; answered from a host copy of the positions, no device sync); at least 1 so scoring never sees an
        empty key set (rows after a query's position are causally masked)."""
        return max(bisect.bisect_right(self._host_positions, int(max_position)), 1)

    def to_local(self, indices: torch.Tensor) -> torch.Tensor:
        """Global key positions (int, −1 empty) → this rank's rows, −1 where empty or held by another rank."""
        safe = indices.clamp_min(0).long()
        mine = (indices >= 0) & (self.owner[safe] == self.cp_rank)
        return torch.where(mine, self.row[safe], INVALID_INDEX).to(torch.int32)


@dataclass
class LayerKVCache:
    """One layer's cache on this rank (rows in :class:`CacheLayout` order) for a batch of sequences."""

    key: torch.Tensor
    """[B, rows, Hkv, d_qk] attention keys (MLA: the latent ``[c_kv, rope(k_rope)]``, Hkv = 1)."""
    value: torch.Tensor | None
    """[B, rows, Hkv, d_v] values (GQA); None for MLA, whose values are ``key[..., :v_dim]``."""
    v_dim: int | None
    """MLA: kv_lora, the leading key dims that are the values; None when ``value`` is stored."""
    index_key: torch.Tensor
    """[B, rows, d_I] indexer keys as scored (rope + Hadamard; e4m3 stored as its bytes in uint8 when FP8)."""
    index_scale: torch.Tensor | None
    """[B, rows] fp32 per-key FP8 scale, or None when the indexer does not quantise."""
    index_dtype: torch.dtype
    """dtype of the scored index keys (float8_e4m3fn with FP8)."""

    @classmethod
    def allocate(cls, batch: int, rows: int, *, kv_heads: int, qk_dim: int, v_dim: int, latent: bool,
                 index_dim: int, fp8: bool, dtype: torch.dtype, device: torch.device) -> LayerKVCache:
        """Zeroed storage for ``batch`` sequences of ``rows`` local rows, plus one scratch row at the end that
        absorbs the writes of tokens another CP rank owns (so a write never needs a data-dependent host sync)."""
        rows += 1
        key = torch.zeros(batch, rows, kv_heads, qk_dim, dtype=dtype, device=device)
        value = None if latent else torch.zeros(batch, rows, kv_heads, v_dim, dtype=dtype, device=device)
        index_dtype = torch.float8_e4m3fn if fp8 else dtype
        index_key = torch.zeros(batch, rows, index_dim, dtype=torch.uint8 if fp8 else dtype, device=device)
        index_scale = torch.ones(batch, rows, dtype=torch.float32, device=device) if fp8 else None
        return cls(key, value, v_dim if latent else None, index_key, index_scale, index_dtype)

    @property
    def batch(self) -> int:
        """Sequences held."""
        return self.key.shape[0]

    @property
    def rows(self) -> int:
        """Local rows per sequence (the scratch row excluded)."""
        return self.key.shape[1] - 1

    @property
    def nbytes(self) -> int:
        """Bytes held by this layer's cache."""
        parts = [self.key, self.value, self.index_key, self.index_scale]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def write(self, mine: torch.Tensor, rows: torch.Tensor, key: torch.Tensor, value: torch.Tensor | None,
              index_key: torch.Tensor, index_scale: torch.Tensor | None) -> None:
        """Store new tokens ``[B, n, ...]`` at local ``rows`` [B, n] where ``mine`` [B, n] (this rank owns them)."""
        scratch = self.key.shape[1] - 1
        r = torch.where(mine, rows, scratch)
        b = torch.arange(r.shape[0], device=r.device)[:, None].expand_as(r)
        self.key[b, r] = key.to(self.key.dtype)
        if self.value is not None:
            self.value[b, r] = value.to(self.value.dtype)
        idx = index_key.to(self.index_dtype)
        self.index_key[b, r] = idx.view(torch.uint8) if self.index_dtype == torch.float8_e4m3fn else idx
        if self.index_scale is not None:
            self.index_scale[b, r] = index_scale.float()

    def keys(self, rows: int) -> torch.Tensor:
        """[B, rows, Hkv, d_qk] view of the first ``rows`` rows."""
        return self.key[:, :rows]

    def values(self, rows: int) -> torch.Tensor:
        """[B, rows, Hkv, d_v] view (MLA: the latent's first kv_lora dims — no copy)."""
        return self.key[:, :rows, :, : self.v_dim] if self.value is None else self.value[:, :rows]

    def index_keys(self, rows: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(index keys [B, rows, d_I] in the scored dtype, scales [B, rows] or None) of the first ``rows`` rows."""
        k = self.index_key[:, :rows]
        if self.index_dtype == torch.float8_e4m3fn:
            k = k.view(torch.float8_e4m3fn)
        return k, None if self.index_scale is None else self.index_scale[:, :rows]


@dataclass
class DecodeCache:
    """All layers' caches of one batch on this rank, with their shared :class:`CacheLayout`."""

    layout: CacheLayout
    layers: list[LayerKVCache]

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)


def kv_cache_bytes_per_token(cfg, *, tp: int = 1) -> int:
    """Cache bytes per token per layer on one rank for model config ``cfg`` (:class:`DSAModelConfig`)."""
    elt = cfg.torch_dtype.itemsize
    if cfg.attention == "mla":
        kv = cfg.core_qk_dim * elt
    else:
        kv = 2 * (cfg.gqa.num_kv_heads // tp) * cfg.gqa.head_dim * elt
    ix = cfg.indexer
    index = ix.head_dim + 4 if ix.fp8 else ix.head_dim * elt
    return kv + index


def allocate_cache(cfg, *, num_layers: int, batch: int, layout: CacheLayout, tp: int = 1,
                   dtype: torch.dtype | None = None, device: torch.device | str = "cpu") -> DecodeCache:
    """A zeroed :class:`DecodeCache` for model config ``cfg`` (:class:`DSAModelConfig`) on this rank.

    ``dtype``: the model's activation dtype (default ``cfg.torch_dtype``).
    """
    device = torch.device(device)
    dtype = dtype or cfg.torch_dtype
    latent = cfg.attention == "mla"
    if latent:
        kv_heads, qk_dim, v_dim = 1, cfg.core_qk_dim, cfg.core_v_dim
    else:
        kv_heads, qk_dim, v_dim = cfg.gqa.num_kv_heads // tp, cfg.gqa.head_dim, cfg.gqa.head_dim
    layers = [
        LayerKVCache.allocate(batch, layout.rows, kv_heads=kv_heads, qk_dim=qk_dim, v_dim=v_dim, latent=latent,
                              index_dim=cfg.indexer.head_dim, fp8=cfg.indexer.fp8, dtype=dtype,
                              device=device)
        for _ in range(num_layers)
    ]
    return DecodeCache(layout, layers)
