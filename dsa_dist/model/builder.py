"""Build a Megatron-Core ``GPTModel`` with DSA attention from a :class:`DSAModelConfig` (docs/design.md §3).

``parallel_state`` must be initialised first (:func:`dsa_dist.parallel.init_parallel`). The model runs on CPU
(gloo) and CUDA (NCCL): weights are initialised on the host as full master matrices and sliced per TP rank
(``use_cpu_initialization``), then moved to the rank's device. Position embeddings are off in GPTModel: the DSA
attention applies rotary embeddings itself at global (zigzag under CP) positions. The CPU shims of
:mod:`dsa_dist.compat` are applied here (idempotent), so a model built without ``init_parallel`` works on CPU too.

Usage::

    init_parallel(tp=2, cp=2)
    model = build_model(preset("tiny"), runtime=DSARuntime(attention="sparse", indexer_kl=True))
    tracker = get_indexer_loss_tracker(model)
    tracker.begin_forward(measure_recall=False)                  # before every forward
    per_token_loss = model(tokens, None, None, labels=labels)   # [b, s_local] (tokens/labels zigzag-sharded)
    loss = per_token_loss.mean() + cfg.indexer_loss_coeff * tracker.total()

With ``cfg.recompute.granularity='full'`` (Megatron's full activation recompute) the tracker attaches the KL to
the layer outputs instead (``IndexerLossTracker(attach_coeff=cfg.indexer_loss_coeff)``): the loss is then the LM
loss alone, ``tracker.logged_total()`` gives the KL to log, and ``begin_forward(attach_scale=...)`` the
per-forward weight (see :mod:`dsa_dist.model.indexer_loss`).
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from dsa_dist.compat import apply_cpu_shims, default_device
from dsa_dist.model.attention import _DSAAttentionBase
from dsa_dist.model.config import DSAModelConfig
from dsa_dist.model.indexer_loss import IndexerLossTracker
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.model.specs import dsa_layer_spec


def build_model(cfg: DSAModelConfig, *, runtime: DSARuntime, pre_process: bool = True, post_process: bool = True,
                tracker: IndexerLossTracker | None = None, vp_stage: int | None = None) -> GPTModel:
    """A ``GPTModel`` whose every layer uses DSA attention (MLA or GQA per ``cfg.attention``).

    Args:
        cfg: the model architecture (validated against the initialised TP/CP sizes).
        runtime: what the DSA layers compute — dense or sparse attention, indexer KL on or off (see
            :mod:`dsa_dist.model.runtime`); fixed for the model's lifetime.
        pre_process / post_process: build the embedding / the output layer (pipeline stages).
        tracker: the :class:`IndexerLossTracker` every layer reads its per-forward options from and records its
            KL in; a new one by default (find it again with :func:`get_indexer_loss_tracker`).
        vp_stage: virtual pipeline stage, passed to Megatron.

    Returns:
        The model on this rank's device, in train mode. ``model(input_ids, None, None, labels=labels)`` returns
        the per-token LM loss ``[b, s_local]``; pass ``attention_mask=None`` (attention is causal by position).
    """
    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError("Megatron parallel_state is not initialised: call dsa_dist.parallel.init_parallel(tp, cp) "
                           "before build_model")
    if not isinstance(runtime, DSARuntime):
        raise ValueError(f"runtime must be a dsa_dist.model.DSARuntime, got {runtime!r}; e.g. "
                         "DSARuntime(attention='sparse', indexer_kl=True)")
    apply_cpu_shims()
    config = cfg.to_transformer_config(None)
    tracker = _tracker_for(cfg, runtime, tracker)
    model = GPTModel(
        config=config,
        transformer_layer_spec=dsa_layer_spec(cfg, runtime, tracker),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_embeddings,
        position_embedding_type="none",
        vp_stage=vp_stage,
    )
    if cfg.recompute.full and pre_process:
        model.decoder.register_forward_pre_hook(_decoder_input_requires_grad, with_kwargs=True)
    device = default_device()
    if device.type != "cpu":
        model = model.to(device)
    return model


def _tracker_for(cfg: DSAModelConfig, runtime: DSARuntime, tracker: IndexerLossTracker | None) -> IndexerLossTracker:
    """The layers' tracker: the caller's, or a new one that attaches the KL when full recompute needs it."""
    needs_attach = cfg.recompute.full and runtime.indexer_kl
    keep = cfg.recompute.full and cfg.recompute.keep_topk and runtime.attention == "sparse"
    if tracker is None:
        return IndexerLossTracker(attach_coeff=cfg.indexer_loss_coeff if needs_attach else None,
                                  keep_topk_for_recompute=keep)
    if needs_attach and tracker.attach_coeff is None:
        raise ValueError("model.recompute.granularity='full' with the indexer KL on needs an attaching tracker: the "
                         "first forward of a recomputed layer has no autograd graph, so a KL added to the loss "
                         "through tracker.total() would never train the indexer. Pass "
                         "IndexerLossTracker(attach_coeff=coeff) (or no tracker), or turn recompute off")
    return tracker


def _decoder_input_requires_grad(module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Forward pre-hook of the decoder under full recompute: make its input require grad while training.

    Megatron's reentrant checkpoint runs a layer's backward only if one of its inputs requires grad. When the
    embedding is frozen (the indexer warm-up trains the indexers alone) nothing upstream does, so the recomputed
    forward — the only one whose attached KL has a graph — would never run and the indexers would get no gradient.
    A detached leaf copy of the input (its gradient is dropped) starts that chain; the values are unchanged.
    """
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not (module.training and torch.is_grad_enabled() and isinstance(hidden, torch.Tensor)) or hidden.requires_grad:
        return None
    hidden = hidden.detach().requires_grad_()
    if "hidden_states" in kwargs:
        kwargs["hidden_states"] = hidden
    else:
        args = (hidden, *args[1:])
    return args, kwargs


def get_indexer_loss_tracker(model: torch.nn.Module) -> IndexerLossTracker:
    """The tracker shared by the DSA layers of ``model`` (works through DDP/Float16 wrappers)."""
    for module in model.modules():
        if isinstance(module, _DSAAttentionBase) and module.tracker is not None:
            return module.tracker
    raise ValueError("model has no DSA attention layer with an IndexerLossTracker")


def dsa_attention_layers(model: torch.nn.Module) -> list[_DSAAttentionBase]:
    """The DSA attention modules of ``model`` in layer order."""
    return [m for m in model.modules() if isinstance(m, _DSAAttentionBase)]
