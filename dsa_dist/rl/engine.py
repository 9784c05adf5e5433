"""Prefill and per-token decode of a DSA ``GPTModel`` over a KV + FP8 index-key cache (docs/design.md §1 "GRPO").

The model's own modules do all the work; only the attention's core is replaced by the cached version:

- embedding, each ``TransformerLayer``'s input norm, bias-dropout-add, pre-MLP norm and MLP, the final norm and the
  output layer are the Megatron modules of the model, called in the order ``TransformerLayer.forward`` uses;
- each DSA attention's ``project(x, positions)`` gives queries, keys/values and the indexer inputs, and its
  ``project_output(o)`` the output projection; its indexer's ``index_keys`` / ``index_queries`` give the FP8 keys
  the cache stores and the queries scored against them;
- **prefill** runs the model's DSA steps (:func:`dsa_dist.model.dsa_core.dsa_attention`: sparse top-k attention,
  or dense attention for a dense-runtime model) on the padded prompts, CP-sharded zigzag like training, and caches
  every layer's keys and index keys on the rank that computed them;
- **decode** feeds one token per sequence at its own position: its keys are written to the rank that owns that
  position, the top-k is taken over the cache and attention reads the cache (:mod:`.decode_attention`). Tokens of
  a decode step are projected as one sequence of ``B`` tokens at positions ``[B]`` (projections are per token),
  which gives every sequence its own rotary position in one call.

Every CP rank runs the same decode tokens (the per-token work is replicated; only the cache is sharded), so logits
and sampled tokens agree on all ranks. Pipeline parallelism is not supported (one rank must hold every layer).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsa_dist.model.builder import dsa_attention_layers
from dsa_dist.model.dsa_core import dsa_attention
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.rl.decode_attention import cache_attention, cache_topk, plan_step
from dsa_dist.rl.kv_cache import CacheLayout, DecodeCache, allocate_cache

AttentionFn = Callable[[int, torch.nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]


def prefill_multiple(dims) -> int:
    """What a prefill length must be a multiple of under ``dims`` (:class:`dsa_dist.parallel.ParallelDims`): the
    zigzag CP split needs ``2·cp`` chunks and the indexer splits each rank's rows over TP."""
    return (2 * dims.cp if dims.cp > 1 else 1) * dims.tp


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``GPTModel`` inside DDP / Float16Module wrappers (they keep it in ``.module``)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


class DecodeEngine:
    """Cached generation state of one batch: ``prefill(tokens)`` once, then ``step(tokens, positions)`` per token.

    Args:
        model: a DSA ``GPTModel`` (:func:`dsa_dist.model.build_model`), possibly wrapped; PP = 1.
        batch: sequences decoded together.
        prefill_len: padded prompt length given to :meth:`prefill` (a multiple of ``2·cp·tp``; 0: no prefill).
        decode_len: positions after ``prefill_len`` that decode steps may write.
        record_topk: also return each layer's selected indices (the indexer's choice, in dense mode too).
        attention: "sparse" / "dense" decoding; None (default): the model's runtime (``DSARuntime.attention``).
        cache: reuse this :class:`DecodeCache` (same batch and layout) instead of allocating one — e.g. to time
            sparse and dense decoding over one cache.
        dense_kernel: how dense decoding attends with CP = 1: ``"sdpa"``, ``"split"`` (split-KV through the
            sparse kernel; see :func:`dsa_dist.rl.decode_attention.cache_attention`) or ``"auto"``: split on CUDA
            (1.3–9× faster than SDPA's memory-efficient kernel on an H100 at 4K–128K, benchmarks/results/
            decode_h100.md), SDPA elsewhere.
    """

    def __init__(self, model: torch.nn.Module, *, batch: int, prefill_len: int, decode_len: int,
                 record_topk: bool = False, attention: str | None = None, cache: DecodeCache | None = None,
                 dense_kernel: str = "auto") -> None:
        gpt = unwrap_model(model)
        if not (getattr(gpt, "pre_process", False) and getattr(gpt, "post_process", False)):
            raise ValueError("rollout generation needs the embedding and the output layer on this rank "
                             "(pipeline parallel size 1); build the model with pre_process=post_process=True")
        self.gpt = gpt
        self.layers = list(gpt.decoder.layers)
        self.attns = dsa_attention_layers(gpt)
        if len(self.attns) != len(self.layers):
            raise ValueError(f"every layer must use DSA attention: {len(self.attns)} DSA attentions in "
                             f"{len(self.layers)} layers")
        first = self.attns[0]
        self.cfg, self.dims = first.dsa, first.dims
        attention = first.runtime.attention if attention is None else attention
        if attention not in ("sparse", "dense"):
            raise ValueError(f"attention must be 'sparse', 'dense' or None (the model's runtime), got {attention!r}")
        self.sparse = attention == "sparse"
        if dense_kernel not in ("auto", "sdpa", "split"):
            raise ValueError(f"dense_kernel must be 'auto', 'sdpa' or 'split', got {dense_kernel!r}")
        self.record_topk = record_topk
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        self.batch = batch
        multiple = prefill_multiple(self.dims)
        if prefill_len % multiple:
            raise ValueError(f"prefill_len={prefill_len} must be a multiple of {multiple} (2·cp·tp); pad the prompts")
        param = next(first.parameters())
        self.device, dtype = param.device, param.dtype
        self.layout = CacheLayout(prefill_len, decode_len, cp_size=self.dims.cp, cp_rank=self.dims.cp_rank,
                                  device=self.device)
        if cache is None:
            cache = allocate_cache(self.cfg, num_layers=len(self.layers), batch=batch, layout=self.layout,
                                   tp=self.dims.tp, dtype=dtype, device=self.device)
        elif (cache.layout.capacity, cache.layers[0].batch, cache.layers[0].rows) != (self.layout.capacity, batch,
                                                                                       self.layout.rows):
            raise ValueError("the given cache does not match this engine's batch / prefill_len / decode_len")
        self.cache: DecodeCache = cache
        if dense_kernel == "auto":
            dense_kernel = "split" if self.device.type == "cuda" else "sdpa"
        self.dense_kernel = dense_kernel

    # ------------------------------------------------------------------------------------------ the layer loop
    def _forward(self, tokens: torch.Tensor, attention: AttentionFn, *, logits: bool) -> torch.Tensor | None:
        """Run ``tokens`` [B, n] through the model with ``attention(layer_idx, attn, x [B, n, hidden])`` in place
        of each self-attention; returns logits [B, n, V] (gathered over TP) when ``logits``."""
        h = self.gpt.embedding(input_ids=tokens, position_ids=None)  # [n, B, hidden]
        for i, (layer, attn) in enumerate(zip(self.layers, self.attns)):
            residual = h
            x = layer.input_layernorm(h)
            out, bias = attention(i, attn, x.transpose(0, 1))  # batch-first in and out
            h = layer.self_attn_bda(False, layer.config.bias_dropout_fusion)(
                (out.transpose(0, 1), bias), residual, layer.hidden_dropout)
            residual = h
            mlp_out = layer.mlp(layer.pre_mlp_layernorm(h))
            h = layer.mlp_bda(False, layer.config.bias_dropout_fusion)(mlp_out, residual, layer.hidden_dropout)
        if not logits:
            return None
        if self.gpt.decoder.final_layernorm is not None:
            h = self.gpt.decoder.final_layernorm(h)
        weight = self.gpt.shared_embedding_or_output_weight() if self.gpt.share_embeddings_and_output_weights else None
        out, _ = self.gpt.output_layer(h, weight=weight, runtime_gather_output=True)  # [n, B, V]
        return out.transpose(0, 1)

    # ------------------------------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> dict[int, torch.Tensor] | None:
        """Fill the cache with ``tokens`` [B, prefill_len] (the whole padded prompts, same on every CP rank).

        Returns, with ``record_topk``, ``{layer_number: [B, prefill_len, k] int32}``: every prompt row's selected
        global key positions (gathered over CP); otherwise None.
        """
        dims, layout = self.dims, self.layout
        if tokens.shape != (self.batch, layout.prefill_len):
            raise ValueError(f"prefill tokens must be [{self.batch}, {layout.prefill_len}], got {tuple(tokens.shape)}")
        if layout.prefill_len == 0:
            return {} if self.record_topk else None
        local = tokens
        if dims.cp > 1:
            from dsa_dist.parallel import zigzag_split

            local = zigzag_split(tokens, 1, dims.cp, dims.cp_rank)
        positions = dims.local_positions(local.shape[1], self.device)
        mine, rows = layout.locate(positions.expand(self.batch, -1))
        tracker = IndexerLossTracker()
        tracker.begin_forward(record_topk=self.record_topk)
        runtime = DSARuntime(attention="sparse" if self.sparse else "dense", indexer_kl=False)

        def attention(i: int, attn, x: torch.Tensor):
            inputs = attn.project(x, positions)
            k_index, k_scale = attn.indexer.index_keys(inputs.indexer_h, positions)
            self.cache.layers[i].write(mine, rows, inputs.k, inputs.v, k_index, k_scale)
            o = dsa_attention(inputs, indexer=attn.indexer, dsa=attn.dsa, runtime=runtime, dims=attn.dims,
                              tracker=tracker, layer=attn.layer_number)
            return attn.project_output(o)

        self._forward(local, attention, logits=False)
        if not self.record_topk:
            return None
        recorded = tracker.topk()
        if dims.cp > 1:
            from dsa_dist.parallel import all_gather_sequence

            recorded = {layer: all_gather_sequence(idx, 1, dims.cp_group) for layer, idx in recorded.items()}
        return recorded

    # ------------------------------------------------------------------------------------------ decode
    @torch.no_grad()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor, *, max_position: int | None = None
             ) -> tuple[torch.Tensor, dict[int, torch.Tensor] | None]:
        """Feed one token per sequence: ``tokens`` [B] at ``positions`` [B] (each sequence's next position).

        ``max_position``: a host int ≥ every entry of ``positions`` (checked on the device); the step then reads
        only the cache rows up to it instead of the whole capacity. A step never synchronises with the device
        (pass ``tokens`` / ``positions`` already on it): every shape is fixed on the host, value checks are
        device-side assertions, and the top-k takes per-sequence positions in one call per layer.

        Returns ``(logits [B, V] float, {layer_number: [B, k] int32 global key positions} or None)``.
        """
        if tokens.shape != (self.batch,) or positions.shape != (self.batch,):
            raise ValueError(f"step takes tokens and positions of shape [{self.batch}], got "
                             f"{tuple(tokens.shape)} and {tuple(positions.shape)}")
        layout, topk = self.layout, self.cfg.indexer.topk
        pos = positions.to(self.device).long()
        plan = plan_step(layout, pos[:, None], max_position)  # once per step: shared by every layer
        want_topk = self.sparse or self.record_topk
        selected: dict[int, torch.Tensor] = {}

        def attention(i: int, attn, x: torch.Tensor):
            # x [B, 1, hidden] → one sequence of B tokens at positions [B]: each token gets its own rotary angle.
            xs = x.transpose(0, 1)
            inputs = attn.project(xs, pos)
            k_index, k_scale = attn.indexer.index_keys(inputs.indexer_h, pos)
            cache = self.cache.layers[i]
            cache.write(plan.mine, plan.write_rows, inputs.k.transpose(0, 1),
                        None if inputs.v is None else inputs.v.transpose(0, 1), k_index.transpose(0, 1),
                        None if k_scale is None else k_scale.transpose(0, 1))
            idx = None
            if want_topk:
                q_index, weights = attn.indexer.index_queries(inputs.indexer_cq, inputs.indexer_h, pos)
                idx = cache_topk(q_index.transpose(0, 1), weights.transpose(0, 1), cache, layout, plan, topk,
                                 cp_group=attn.dims.cp_group)  # [B, 1, k]
                selected[attn.layer_number] = idx[:, 0]
            o = cache_attention(inputs.q.transpose(0, 1), cache, layout, plan, idx if self.sparse else None,
                                attn.dsa.softmax_scale, cp_group=attn.dims.cp_group,
                                dense_kernel=self.dense_kernel)  # [B, 1, H/tp, d_v]
            return attn.project_output(o)

        logits = self._forward(tokens.to(self.device).long()[:, None], attention, logits=True)
        return logits[:, 0].float(), (selected if self.record_topk else None)
