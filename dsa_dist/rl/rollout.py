"""Batched rollout generation with the model's own DSA (docs/design.md §1 "GRPO"): prompts in, sampled responses
with the sampler's log-probs, kept-token sets and (optionally) the indexer's selected keys out.

How a batch is generated (:func:`generate`):

1. The prompts (any lengths) are right-padded to ``prefill_len`` ≥ ``max(len) − 1`` and **prefilled without their
   last token**: the model's DSA forward (sparse, or dense for a dense-runtime model; CP-sharded zigzag) fills every
   layer's KV cache and FP8 index-key cache. Right padding is harmless: attention is causal, and a pad row at
   position ``p`` of a shorter prompt is overwritten by that sequence's own token at ``p`` before anything reads it.
2. Decode step ``t`` feeds each sequence's latest token at its own position ``P_b − 1 + t`` (step 0: the last
   prompt token), scores one indexer top-k per layer over the cache, attends, and samples token ``t`` of the
   response from the logits with :func:`dsa_dist.rl.sampling.sample_tokens`. So the selected indices recorded for a
   generated token are those of the query row that produced it — the rows the trainer's forward evaluates.
3. A sequence finishes after a stop token or ``max_new_tokens``; it stops growing (later slots are padding with
   ``response_mask`` False; it keeps stepping on pad tokens so the batch shape stays fixed) and the loop ends when
   every sequence has finished.

Sequences are decoded sorted by prompt length (the row order the sampler's draws follow; each layer's top-k is
one call over all positions whatever the order) and returned in the caller's order. A decode step itself never
synchronises with the device; the loop reads its two flags (all finished? a non-finite logit seen?) once every
:data:`SYNC_EVERY` tokens, so the host queues several steps ahead of the GPU.

The trainer replays the recorded indices with :func:`replay_topk` (the format of
``IndexerLossTracker.begin_forward(replay_topk=...)``), so its forward attends exactly where the sampler did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsa_dist.model.builder import dsa_attention_layers
from dsa_dist.rl.engine import DecodeEngine, prefill_multiple, unwrap_model
from dsa_dist.rl.sampling import SamplingParams, sample_tokens
from dsa_dist.train.errors import NonFiniteError

SYNC_EVERY = 8  # generated tokens between the loop's host syncs (its stop check)


@dataclass
class Rollout:
    """One generated batch. ``B`` sequences, ``P`` = longest prompt, ``N`` = decode steps run (≤ max_new_tokens)."""

    tokens: torch.Tensor
    """[B, P + N] int64: prompt ``b`` in ``[:P_b]``, its response from ``P_b``, right-padded with the pad id."""
    prompt_lens: torch.Tensor
    """[B] int64 ``P_b``."""
    response_mask: torch.Tensor
    """[B, N] bool: response token ``t`` of sequence ``b`` exists (it is ``tokens[b, P_b + t]``)."""
    logprobs: torch.Tensor
    """[B, N] float32: the sampler's log-probability of each response token (0 where masked)."""
    kept_mask: torch.Tensor
    """[B, N, V] bool: the sampler's kept-token set (top-k/top-p truncation) of each response token."""
    topk_indices: dict[int, torch.Tensor] | None = None
    """``{layer_number: [B, N, k] int32}``: global key positions (within the sequence) the indexer selected at the
    query row that produced response token ``t`` (position ``P_b − 1 + t``); −1 for empty slots / masked tokens."""
    prompt_topk: dict[int, torch.Tensor] | None = None
    """``{layer_number: [B, P, k] int32}``: the selections of the prompt rows ``< P_b − 1`` (from the prefill);
    −1 elsewhere. With :attr:`topk_indices` this covers every row the trainer's forward evaluates."""

    @property
    def response_lens(self) -> torch.Tensor:
        """[B] int64 number of response tokens of each sequence."""
        return self.response_mask.sum(-1)

    def response_tokens(self) -> torch.Tensor:
        """[B, N] int64 response tokens (pad id where masked)."""
        cols = self.prompt_lens[:, None] + torch.arange(self.response_mask.shape[1], device=self.tokens.device)
        return self.tokens.gather(1, cols.clamp_max(self.tokens.shape[1] - 1))


def _check_prompts(prompts: list[list[int]], vocab: int) -> None:
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompts[{i}] must be a non-empty list of token ids, got {p!r}")
        bad = [t for t in p if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompts[{i}] holds token ids outside [0, vocab_size={vocab}): {bad[:5]}")


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


@torch.no_grad()
def generate(model: torch.nn.Module, prompts: list[list[int]], params: SamplingParams, *,
             generator: torch.Generator, record_topk: bool = False, pad_id: int = 0,
             cuda_graph: bool = True) -> Rollout:
    """Sample a response for every prompt with KV-cache decoding through the model's own DSA.

    Args:
        model: a DSA ``GPTModel`` (sparse or dense runtime). Under TP/CP every rank of the model-parallel group
            calls this with the same prompts and an identically seeded ``generator`` (the first rank's draws are
            broadcast, so the sequences cannot diverge).
        prompts: ``B`` token-id lists (lengths may differ).
        params: temperature / top-p / top-k / max_new_tokens / stop_token_ids.
        generator: the sampler's randomness (seeded → reproducible rollouts).
        record_topk: also return the indexer's selected key positions per layer (:attr:`Rollout.topk_indices`,
            :attr:`Rollout.prompt_topk`) for top-k replay in the trainer.
        pad_id: token id written after each response.
        cuda_graph: on CUDA with TP = CP = 1, capture the decode step once and replay it per token
            (:class:`dsa_dist.rl.cuda_graph.GraphedDecodeStep`; same tokens, log-probs and indices as eager steps).
            The graph reads the whole cache each step; eager steps read the rows up to the furthest position.

    Returns:
        A :class:`Rollout`, tensors on the model's device.
    """
    gpt = unwrap_model(model)
    vocab = gpt.vocab_size
    _check_prompts(prompts, vocab)
    if not 0 <= pad_id < vocab:
        raise ValueError(f"pad_id={pad_id} must be a token id in [0, vocab_size={vocab})")
    # Decode in prompt-length order (see the module docstring); outputs return in the caller's order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    prompts = [prompts[i] for i in order]
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    p_max, n_max = int(lens.max()), params.max_new_tokens
    dims = dsa_attention_layers(gpt)[0].dims
    prefill_len = _round_up(p_max - 1, prefill_multiple(dims))
    # Decode feeds positions P_b − 1 … P_b + N − 2; the last sampled token is never fed.
    decode_len = max(1, p_max + n_max - 1 - prefill_len)
    engine = DecodeEngine(model, batch=b, prefill_len=prefill_len, decode_len=decode_len, record_topk=record_topk)
    device = engine.device

    tokens = torch.full((b, p_max + n_max), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
    tokens = tokens.to(device)
    lens = lens.to(device)
    prompt_rows = engine.prefill(tokens[:, :prefill_len].clone())  # last prompt tokens are fed by decode step 0

    stop = torch.tensor(params.stop_token_ids, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    mask = torch.zeros(b, n_max, dtype=torch.bool, device=device)
    logprobs = torch.zeros(b, n_max, dtype=torch.float32, device=device)
    kept = torch.zeros(b, n_max, vocab, dtype=torch.bool, device=device)
    k = engine.cfg.indexer.topk
    selected = ({a.layer_number: torch.full((b, n_max, k), -1, dtype=torch.int32, device=device)
                 for a in engine.attns} if record_topk else None)
    rows = torch.arange(b, device=device)
    cur, pos = tokens[rows, lens - 1], lens - 1
    graphed = None
    if cuda_graph and device.type == "cuda" and dims.cp == 1 and dims.tp == 1:
        from dsa_dist.rl.cuda_graph import GraphedDecodeStep

        graphed = GraphedDecodeStep(engine)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # first step with non-finite logits (−1: none)
    steps = 0
    for t in range(n_max):
        if graphed is not None:
            logits, step_topk = graphed(cur, pos)  # [B, V]; the captured step reads the whole cache
        else:
            # The host knows the furthest position of the step (longest prompt − 1 + t): the step reads only the
            # cache rows up to it and never asks the device.
            logits, step_topk = engine.step(cur, pos, max_position=p_max - 1 + t)
        finite = torch.isfinite(logits).all()
        first_bad = torch.where(finite | (first_bad >= 0), first_bad, t)
        # Until the check below, draw from zeros in place of non-finite logits (a NaN CDF could index past the
        # vocabulary); the rollout is discarded then.
        token, logprob, kept_t = sample_tokens(torch.where(finite, logits, 0.0), params, generator)
        token = _same_on_model_parallel_ranks(token, dims)
        active = ~finished
        # Column P_b + t; a finished sequence's column lies past its response, so writing pad there is harmless
        # (and a scatter needs no host sync, unlike boolean indexing).
        tokens.scatter_(1, (lens + t)[:, None], torch.where(active, token, pad_id)[:, None])
        mask[:, t] = active
        logprobs[:, t] = torch.where(active, logprob, 0.0)
        kept[:, t] = kept_t & active[:, None]
        if selected is not None:
            for layer, idx in step_topk.items():
                selected[layer][:, t] = torch.where(active[:, None], idx, -1)
        steps = t + 1
        finished |= active & torch.isin(token, stop)
        # The loop's only host sync: every SYNC_EVERY tokens (and at the last) it reads whether to go on, so in
        # between the host enqueues the next steps while the GPU runs. Steps after every sequence finished write
        # only masked slots and are trimmed below.
        if steps % SYNC_EVERY == 0 or steps == n_max:
            all_finished, bad = torch.stack([finished.all().long(), first_bad]).tolist()
            if bad >= 0:  # NaN/inf logits cannot be sampled (the inverse CDF would be garbage)
                raise NonFiniteError(f"the model produced non-finite logits at decode step {bad} of the rollout: "
                                     "its weights diverged (e.g. too large a learning rate); lower it and resume "
                                     "from the last checkpoint")
            if all_finished:
                break
        # Finished sequences keep stepping (batch shapes stay fixed) on pad tokens; nothing of theirs is kept.
        cur, pos = torch.where(finished, pad_id, token), pos + 1
    # Active columns are a prefix (a sequence never restarts): keep up to the last step any sequence produced.
    steps = int(mask[:, :steps].any(0).sum())

    prompt_topk = None
    if record_topk:
        prompt_topk = {}
        for layer, idx in (prompt_rows or {}).items():
            full = torch.full((b, p_max, k), -1, dtype=torch.int32, device=device)
            n = min(p_max, idx.shape[1])
            full[:, :n] = idx[:, :n].to(device=device, dtype=torch.int32)
            keep = torch.arange(p_max, device=device)[None, :] < (lens - 1)[:, None]  # rows < P_b − 1
            prompt_topk[layer] = torch.where(keep[..., None], full, -1)
        for layer in selected:
            prompt_topk.setdefault(layer, torch.full((b, p_max, k), -1, dtype=torch.int32, device=device))
    back = torch.argsort(torch.tensor(order, device=device))  # sorted rows → the caller's order
    return Rollout(
        tokens=tokens[back, : p_max + steps], prompt_lens=lens[back], response_mask=mask[back, :steps],
        logprobs=logprobs[back, :steps], kept_mask=kept[back, :steps],
        topk_indices=None if selected is None else {layer: v[back, :steps] for layer, v in selected.items()},
        prompt_topk=None if prompt_topk is None else {layer: v[back] for layer, v in prompt_topk.items()},
    )


def _same_on_model_parallel_ranks(token: torch.Tensor, dims) -> torch.Tensor:
    """TP and CP ranks compute identical logits; broadcasting their first rank's draw guards against differently
    seeded generators silently splitting the ranks' sequences."""
    import torch.distributed as dist

    for size, group in ((dims.cp, dims.cp_group), (dims.tp, dims.tp_group)):
        if size > 1:
            token = token.contiguous()
            dist.broadcast(token, src=dist.get_global_rank(group, 0), group=group)
    return token


def replay_topk(rollout: Rollout, *, seq_len: int | None = None, cp_size: int = 1,
                cp_rank: int = 0) -> dict[int, torch.Tensor]:
    """The rollout's selections as the trainer's replay input: ``{layer_number: [B, L_local, k] int32}``.

    Row ``r`` of sequence ``b`` in a forward over ``rollout.tokens`` (right-padded to ``seq_len``, default
    ``P + N``) gets the indices the sampler used at that position: prompt rows from the prefill, row
    ``P_b − 1 + t`` those that produced response token ``t``; rows after the response are empty (−1; their outputs
    feed no response log-prob). With ``cp_size > 1`` the rows are this CP rank's zigzag shard. Pass the result to
    ``IndexerLossTracker.begin_forward(replay_topk=...)``.
    """
    if rollout.topk_indices is None or rollout.prompt_topk is None:
        raise ValueError("the rollout has no recorded top-k indices: call generate(..., record_topk=True)")
    tokens = rollout.tokens
    b, width = tokens.shape
    seq_len = width if seq_len is None else seq_len
    if seq_len < width:
        raise ValueError(f"seq_len={seq_len} is shorter than the rollout's {width} tokens")
    p_max = rollout.prompt_topk[next(iter(rollout.prompt_topk))].shape[1]
    n = rollout.response_mask.shape[1]
    rows = (rollout.prompt_lens[:, None] - 1 + torch.arange(n, device=tokens.device)).clamp_min(0)  # [B, N]
    out = {}
    for layer, resp in rollout.topk_indices.items():
        k = resp.shape[-1]
        full = torch.full((b, seq_len, k), -1, dtype=torch.int32, device=tokens.device)
        full[:, :p_max] = rollout.prompt_topk[layer]
        bi, ti = rollout.response_mask.nonzero(as_tuple=True)
        full[bi, rows[bi, ti]] = resp[bi, ti]
        if cp_size > 1:
            from dsa_dist.parallel import zigzag_split

            full = zigzag_split(full, 1, cp_size, cp_rank)
        out[layer] = full
    return out
