"""Per-forward state of the DSA layers (docs/design.md §1 "Losses"): options in, per-layer KL, recall, top-k out.

Before each forward the loop calls :meth:`IndexerLossTracker.begin_forward` with that forward's options (recall
sampling, top-k recording or replay). Each DSA attention layer records its live KL tensor here during the forward
pass (when its :class:`~dsa_dist.model.runtime.DSARuntime` computes the KL); the training loop adds
``coeff * tracker.total()`` to its LM loss. The KL's inputs (attention target and, in both modes, the indexer's
inputs) are detached, so this term's gradient reaches the indexer parameters only and the LM loss reaches only
the main model: one backward serves both.

What a recorded value means: the mean KL over the query rows *this rank* scored. Under tensor parallelism each TP
rank scores a disjoint, equally sized subset of rows (the indexer parameters carry
``average_gradients_across_tp_domain`` so Megatron's ``finalize_model_grads`` averages their gradients over TP);
under context parallelism each CP rank scores its own zigzag rows (Megatron's DDP averages over DP×CP). Averaging
the recorded value over the TP and CP groups — :meth:`IndexerLossTracker.values` with ``reduce=True`` — gives
exactly the single-rank mean.

Pipeline parallelism: a KL recorded on a non-last stage never reaches that stage's backward through the loss.
With ``attach_coeff`` set, each layer instead attaches ``attach_coeff * KL`` to its attention output through an
identity autograd function whose backward feeds the KL a gradient of ``attach_coeff`` (the loss itself stays out
of the LM loss); :meth:`total` then refuses, so the two paths cannot be mixed by accident.

Activation recompute (``model.recompute.granularity='full'``, Megatron's reentrant checkpoint) needs the attach
path too: the first forward of a checkpointed layer runs without grad, so the KL it records has no graph; the
layer runs again in backward with grad, and only a KL attached to *that* output reaches the indexer — once, since
the first forward's attachment is a no-op without grad. :func:`dsa_dist.model.build_model` therefore makes an
attaching tracker when recompute is on. The recomputed forward records again under the same options (they stay in
force until the next :meth:`begin_forward`): the KL, recall and top-k records are overwritten by equal values,
never added, so :meth:`values` and :meth:`logged_total` count each layer once. ``attach_scale`` of
:meth:`begin_forward` carries the per-forward factor of a loss that is not a plain mean (the trainer's per-token
normalisation multiplies the KL by the micro-batch's token count).

``keep_topk_for_recompute`` (sparse models under full recompute): the first forward of a checkpointed layer keeps
its selected indices here and the recomputed forward replays them instead of scoring every key again (the
indexer's O(L²) scoring is most of a long-sequence forward); each is dropped once replayed. Cost: [B, L_local, k]
int32 per checkpointed layer between the forward and that layer's backward.

Fused sparse KL (:func:`dsa_dist.ops.sparse_attention_with_indexer_kl`): a layer may record a *proxy* — a scalar
of value 0 whose gradient is the KL's — together with a separate value tensor that the attention's backward fills.
The KL **value** of such a layer is known only after the backward. :meth:`total` (for the loss) sums the proxies,
so its value before the backward leaves those layers out; when the backward through it has finished, the tensor
:meth:`total` returned is overwritten with the complete sum of the KL values, so code that logs it after
``backward()`` logs the KL. :meth:`values` / :meth:`logged_total` / :meth:`value_tensors` likewise (NaN before).
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist


class IndexerLossTracker:
    """Per-forward state of the DSA layers: the options of this forward in, each layer's KL / recall / top-k out.

    Call :meth:`begin_forward` before every forward pass (each micro-batch): it forgets the previous forward's
    records and sets this forward's options. Whether the KL is computed at all is the model's
    :class:`~dsa_dist.model.runtime.DSARuntime` (``indexer_kl``), fixed at build time; ``module.training`` plays
    no part. Options stay in force until the next :meth:`begin_forward` (so activation recompute sees them too).

    Args:
        attach_coeff: None (default): the training loop adds ``coeff * total()``. A float: layers attach the KL
            to their output with this coefficient (for pipeline parallelism), see the module docstring.
    """

    def __init__(self, attach_coeff: float | None = None, keep_topk_for_recompute: bool = False) -> None:
        self.attach_coeff = attach_coeff
        self.keep_topk_for_recompute = keep_topk_for_recompute
        self._kept: dict[int, torch.Tensor] = {}  # first forward's top-k of checkpointed layers, until replayed
        self._attach_scale: float | torch.Tensor = 1.0
        self._measure_recall = False
        self._record_topk = False
        self._replay: dict[int, torch.Tensor] | None = None
        self._losses: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._deferred: set[int] = set()  # layers whose recorded loss is a fused proxy (value after backward)
        self._recall: dict[int, torch.Tensor] = {}
        self._topk: dict[int, torch.Tensor] = {}

    def begin_forward(self, *, measure_recall: bool = False, record_topk: bool = False,
                      replay_topk: dict[int, torch.Tensor] | None = None,
                      attach_scale: float | torch.Tensor = 1.0) -> None:
        """Start a forward pass: clear the records and set its options.

        Args:
            measure_recall: every layer measures the indexer recall on a few sampled query rows (share of the
                dense attention mass covered by the top-k set; the top-k and an extra partial attention pass, so
                ask for it on logging steps only). Independent of the KL: the dense stage can report it too.
            record_topk: every layer records its selected key indices (see :meth:`topk`).
            replay_topk: ``{layer_number: indices}`` with indices ``[B, L_local, k]`` int32 *global* key indices
                (−1 = empty slot) for this rank's local tokens, in the format :meth:`topk` returns (under CP the
                rank's zigzag shard of the full ``[B, L, k]``: ``zigzag_split(full, 1, cp, cp_rank)``; the same on
                every TP rank; any k >= 1). Each layer then uses these indices instead of its own top-k — for the
                sparse attention and the sparse KL alike (GRPO's indexer top-k replay); every entry must be −1 or
                a causal key. Needs ``DSARuntime(attention="sparse")``.
            attach_scale: with ``attach_coeff`` set, the KL of this forward is backpropagated with the weight
                ``attach_coeff * attach_scale`` (a float, or a scalar tensor on the model's device: no host sync);
                ignored otherwise.
        """
        self._attach_scale = attach_scale
        self._measure_recall = bool(measure_recall)
        self._record_topk = bool(record_topk)
        self._replay = None if replay_topk is None else dict(replay_topk)
        self._losses.clear()
        self._values.clear()
        self._deferred.clear()
        self._recall.clear()
        self._topk.clear()
        self._kept.clear()

    # ---------------------------------------------------------------------------------- read by the layers
    @property
    def measure_recall(self) -> bool:
        """Whether this forward measures the indexer recall."""
        return self._measure_recall

    @property
    def record_topk(self) -> bool:
        """Whether the layers hand their selected indices to :meth:`record_selected` in this forward (asked by
        ``begin_forward``, or kept for the recomputed forward of a checkpointed layer)."""
        return self._record_topk or self._keeping()

    def _keeping(self) -> bool:
        """First (no-grad) forward of a layer inside Megatron's activation checkpoint, with top-k keeping on."""
        return self.keep_topk_for_recompute and not torch.is_grad_enabled() and _in_checkpoint()

    def _replaying_kept(self) -> bool:
        """The recomputed forward (grad on) of a checkpointed layer, with top-k keeping on."""
        return self.keep_topk_for_recompute and torch.is_grad_enabled() and _in_checkpoint()

    @property
    def attach_weight(self) -> float | torch.Tensor | None:
        """The weight a layer attaches its KL with in this forward (``attach_coeff * attach_scale``), or None."""
        if self.attach_coeff is None:
            return None
        return self.attach_coeff * self._attach_scale

    def replayed_topk(self, layer: int) -> torch.Tensor | None:
        """The indices to replay in ``layer`` this forward, or None (the layer selects its own)."""
        if self._replay is None:
            return None
        if layer not in self._replay:
            raise ValueError(f"replay_topk has no indices for layer {layer} (it has layers {sorted(self._replay)}); "
                             "pass the indices of every DSA layer of the model, as topk() records them")
        return self._replay[layer]

    def kept_topk(self, layer: int) -> torch.Tensor | None:
        """In the recomputed forward of a checkpointed layer: the indices [B, L_local, k] it used in its first
        forward (dropped from here; see ``keep_topk_for_recompute``), else None. Trusted as they are: they were
        selected, or validated as a replay, by this very layer."""
        if self._replaying_kept() and layer in self._kept:
            return self._kept.pop(layer)
        return None

    def record(self, layer: int, loss: torch.Tensor, value: torch.Tensor | None = None) -> None:
        """Store the live KL of ``layer`` (a scalar). A layer recorded twice (e.g. recompute) keeps the latest.

        ``value``: the fused path's KL value tensor (0-dim, filled in place by the backward), when ``loss`` is the
        fused op's proxy (value 0, exact gradient); None: ``loss`` is the KL itself.
        """
        if loss.dim() != 0:
            raise ValueError(f"indexer loss must be a scalar, got shape {tuple(loss.shape)}")
        if value is not None and value.dim() != 0:
            raise ValueError(f"indexer KL value must be a scalar, got shape {tuple(value.shape)}")
        self._losses[layer] = loss
        self._values[layer] = (loss if value is None else value).detach()
        if value is None:
            self._deferred.discard(layer)
        else:
            self._deferred.add(layer)

    def record_recall(self, layer: int, recall: torch.Tensor) -> None:
        """Store the (detached) indexer recall of ``layer``."""
        self._recall[layer] = recall.detach().float()

    def record_selected(self, layer: int, indices: torch.Tensor) -> None:
        """Store ``indices`` [B, L_local, k] (global key indices of this rank's tokens) when this forward asks, and
        keep them for the layer's recomputed forward (see :attr:`keep_topk_for_recompute`)."""
        if self._record_topk:
            self._topk[layer] = indices.detach()
        if self._keeping():
            self._kept[layer] = indices.detach()

    # ---------------------------------------------------------------------------------- read by the loop
    def topk(self) -> dict[int, torch.Tensor]:
        """Per layer: the selected indices [B, L_local, k] int32 recorded with ``record_topk=True`` (detached,
        on the model's device) — the format ``begin_forward(replay_topk=...)`` takes."""
        return dict(self._topk)

    @property
    def layers(self) -> list[int]:
        return sorted(self._losses)

    def total(self) -> torch.Tensor:
        """Sum over layers of the live per-layer KL (0 if nothing was recorded); differentiable — the term for the
        loss. Its *value* leaves out fused layers (their proxies are 0): log :meth:`logged_total` instead."""
        if self.attach_coeff is not None:
            raise RuntimeError("IndexerLossTracker(attach_coeff=...) attaches the KL to the layer outputs; "
                               "do not add total() to the loss as well (use values() for logging)")
        if not self._losses:
            return torch.zeros(())
        total = torch.stack([self._losses[k] for k in self.layers]).sum()
        if not (self._deferred & set(self._losses) and total.requires_grad):
            return total
        out = _FillAfterBackward.apply(total, self.value_tensors())
        out.grad_fn.out_ref = weakref.ref(out)  # no cycle: the node must not keep its output alive
        return out

    def value_tensors(self) -> list[torch.Tensor]:
        """Per layer (in layer order) the detached 0-dim KL value tensor. A fused layer's is written by the
        backward: keep the tensors and read them after ``backward()`` (they are NaN before)."""
        return [self._values[k] for k in self.layers]

    def logged_total(self) -> torch.Tensor:
        """Sum over layers of the KL values (detached, fp32; 0 if nothing was recorded), for logging in either mode
        (each layer counted once, also when a recomputed forward recorded it again). With fused layers call it
        after the backward of this forward (NaN before)."""
        if not self._values:
            return torch.zeros(())
        return torch.stack([v.float() for v in self.value_tensors()]).sum()

    def values(self, reduce: bool = False, groups: tuple = ()) -> dict[int, float]:
        """Detached per-layer KL as floats (fused layers: after the backward); ``reduce=True`` averages each over
        ``groups`` (default: TP and CP)."""
        return self._as_floats(self._values, reduce, groups)

    def recall(self, reduce: bool = False, groups: tuple = ()) -> dict[int, float]:
        """Detached per-layer recall as floats (only layers that measured it); ``reduce`` as in :meth:`values`."""
        return self._as_floats(self._recall, reduce, groups)

    @staticmethod
    def _as_floats(store: dict[int, torch.Tensor], reduce: bool, groups: tuple) -> dict[int, float]:
        keys = sorted(store)
        if not keys:
            return {}
        vec = torch.stack([store[k].detach().float().reshape(()) for k in keys])
        if reduce and dist.is_initialized():
            for group in groups or _default_groups():
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(vec, group=group)
                    vec = vec / dist.get_world_size(group)
        return dict(zip(keys, vec.tolist()))


def _in_checkpoint() -> bool:
    """Whether Megatron's activation checkpoint (``tensor_parallel.checkpoint``) is running a forward now."""
    from megatron.core.tensor_parallel.random import is_checkpointing

    return is_checkpointing()


def _default_groups() -> tuple:
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return ()
    return (ps.get_tensor_model_parallel_group(), ps.get_context_parallel_group())


class _FillAfterBackward(torch.autograd.Function):
    """Identity on the summed KL terms; once the backward through it has finished (all layers' backward included,
    where fused layers write their KL values), its output tensor is overwritten with the sum of ``values``."""

    @staticmethod
    def forward(ctx, total: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
        ctx.values = values
        return total.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_ref, values = getattr(ctx, "out_ref", None), ctx.values

        def fill() -> None:
            out = out_ref() if out_ref is not None else None
            if out is not None:
                with torch.no_grad():
                    out.copy_(torch.stack([v.to(out.dtype) for v in values]).sum())

        # Runs when this backward pass ends: after the attention backwards that fill the values.
        torch.autograd.Variable._execution_engine.queue_callback(fill)
        return grad, None


class _AttachLoss(torch.autograd.Function):
    """Identity on ``out``; in backward gives ``loss`` the gradient ``coeff`` (so the loss trains its indexer)."""

    @staticmethod
    def forward(ctx, out: torch.Tensor, loss: torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
        ctx.coeff = coeff.detach() if isinstance(coeff, torch.Tensor) else coeff
        ctx.loss_meta = (loss.shape, loss.dtype, loss.device)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        shape, dtype, device = ctx.loss_meta
        if isinstance(ctx.coeff, torch.Tensor):
            grad_loss = ctx.coeff.to(device=device, dtype=dtype).reshape(()).expand(shape).clone()
        else:
            grad_loss = torch.full(shape, ctx.coeff, dtype=dtype, device=device)
        return grad_out, grad_loss, None


def attach_loss(out: torch.Tensor, loss: torch.Tensor, coeff: float | torch.Tensor) -> torch.Tensor:
    """Return ``out`` unchanged, wired so that its backward also backpropagates ``coeff * loss`` (``coeff``: a
    float or a scalar tensor)."""
    return _AttachLoss.apply(out, loss, coeff)
