"""The ``grpo`` stage: GRPO post-training of a DSA model on Megatron-Core pieces (docs/design.md §1 "GRPO").

One iteration on every data-parallel rank::

    prompts  = stream[it*P + dp_rank*P/dp : ...]          # P/dp prompts, a pure function of (seed, index)
    rollout  = generate(policy, prompts × G)               # sparse-attention KV-cache decode, sampler log-probs,
                                                           # kept-token sets, optionally each layer's top-k
    rewards  = score(reward_fn, rollout)                   # [P/dp, G]; a failing reward scores 0 and is counted
    Â        = R − mean_g(R)                               # (÷ std_g optional); dynamic sampling drops Â ≡ 0
    log π_old, log π_ref = forward(policy), forward(ref)   # no grad, restricted to the sampler's kept sets
    repeat updates_per_iteration times:                    # several optimizer steps on one rollout batch
        for micro-batch: loss = GRPO(π_θ, π_old, π_sampler, π_ref, Â) / global tokens
                               + indexer_coeff · indexer KL · local tokens / global tokens;  backward
        finalize_model_grads (DP sum) → clip → Adam → LR schedule

The policy's gradients are summed over DP ranks (``calculate_per_token_loss``) and each rank divides by the
global response-token count, so the loss is a token mean over the whole rollout batch whatever the layout.
The frozen reference model lives on the same ranks (same TP sharding) and is the stage's initial weights.
Checkpoints (at iteration boundaries, through the training core's
:class:`~dsa_dist.train.checkpoint_manager.CheckpointManager`) hold model, optimizer, scheduler, the per-rank RNG
state and the train state: the iteration (= rollout position: prompts and the rollout generator's seed are
functions of it), the reward-failure count, the skipped updates and the reference's origin (lineage). Resume
takes the newest checkpoint whose checksums verify (a corrupt one is moved aside, the previous one is used) and
refuses a checkpoint trained against another reference than the one this run starts from.

Non-finite numbers never reach a checkpoint (docs/fault_tolerance.md): an update whose loss or grad norm is not
finite is skipped (parameters, Adam state and LR schedule unchanged) and counted; after
``train.max_nonfinite_steps`` skipped updates in a row the run stops with
:class:`~dsa_dist.train.errors.NonFiniteError`. An applied update that leaves non-finite weights (an overflowing
LR) stops the run at once (nothing could be sampled from that policy), and a save refuses non-finite weights.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from dsa_dist.compat import default_device
from dsa_dist.config import TrainRunConfig
from dsa_dist.model.builder import build_model, get_indexer_loss_tracker
from dsa_dist.model.runtime import SPARSE_INFERENCE, DSARuntime
from dsa_dist.parallel import current_parallel_dims
from dsa_dist.rl.losses import GRPOTerms, group_advantages, grpo_terms, nonzero_variance_groups, token_logprobs
from dsa_dist.rl.rewards import PromptGenerator, load_reward, score_responses
from dsa_dist.train import checkpoint as ckpt
from dsa_dist.train.checkpoint_manager import CheckpointManager, lineage_of, verified
from dsa_dist.train.cpu_scope import in_megatron_cpu_scope, megatron_cpu_scope
from dsa_dist.train.data import ByteTokenizer
from dsa_dist.train.errors import CheckpointError, NonFiniteError
from dsa_dist.train.heartbeat import Heartbeat
from dsa_dist.train.metrics import MetricsLogger
from dsa_dist.train.optim import group_lrs, optimizer_step
from dsa_dist.train.setup import build_model_and_optimizer
from dsa_dist.train.stages import resolve_stage
from dsa_dist.train.step import NonFiniteGuard, parameters_finite


@dataclass
class RolloutBatch:
    """This rank's scored rollout: B = prompts × G sequences, L = padded length, N = response slots."""

    tokens: torch.Tensor  # [B, L] int64, prompt then response then padding
    positions: torch.Tensor  # [B, N] int64, column of response token j in tokens
    response: torch.Tensor  # [B, N] int64 response tokens
    mask: torch.Tensor  # [B, N] float, 1 for real response tokens
    sampler_logprobs: torch.Tensor  # [B, N] float32
    kept: torch.Tensor  # [B, N, V] bool
    advantages: torch.Tensor  # [B] float32
    topk: dict[int, torch.Tensor] | None  # layer -> [B, L, k] the sampler's indices of every row (replay), or None

    def rows(self, sl: slice) -> RolloutBatch:
        topk = None if self.topk is None else {k: v[sl] for k, v in self.topk.items()}
        return RolloutBatch(self.tokens[sl], self.positions[sl], self.response[sl], self.mask[sl],
                            self.sampler_logprobs[sl], self.kept[sl], self.advantages[sl], topk)

    def select(self, keep: torch.Tensor) -> RolloutBatch:
        topk = None if self.topk is None else {k: v[keep] for k, v in self.topk.items()}
        return RolloutBatch(self.tokens[keep], self.positions[keep], self.response[keep], self.mask[keep],
                            self.sampler_logprobs[keep], self.kept[keep], self.advantages[keep], topk)


class GRPOTrainer:
    """Builds policy, reference, optimizer and prompt stream of the ``grpo`` stage on this rank; runs it.

    Assembled from the training-core parts: :func:`~dsa_dist.train.setup.build_model_and_optimizer` (policy, DDP,
    optimizer, LR schedule over iterations x updates), :class:`~dsa_dist.train.checkpoint_manager.CheckpointManager`
    (verified resume with fallback, finite-only saves, lineage), :class:`~dsa_dist.train.step.NonFiniteGuard` and
    :class:`~dsa_dist.train.metrics.MetricsLogger`.
    """

    @in_megatron_cpu_scope
    def __init__(self, cfg: TrainRunConfig, stage: str = "grpo", *, init_from: str | Path | None = None,
                 heartbeat: Heartbeat | None = None) -> None:
        self.cfg, self.stage, self.rl = cfg, stage, cfg.rl
        self.plan = resolve_stage(cfg, stage)
        self.dims = current_parallel_dims()
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.device = default_device()
        self.stage_dir = Path(cfg.run_dir) / stage
        self.params = self.rl.sampling.params()
        self.init_from = str(init_from) if init_from is not None else None
        self.heartbeat = heartbeat

        coeff = self.rl.indexer_loss_coeff
        self.indexer_coeff = float(self.plan.model.indexer_loss_coeff if coeff is None else coeff)
        # Sparse attention; the indexer KL only while the indexers train (coefficient 0 freezes them at their
        # stage-2 weights). The LR schedule runs over optimizer steps: iterations x updates_per_iteration.
        self.parts = build_model_and_optimizer(
            cfg, self.plan, runtime=DSARuntime(attention="sparse", indexer_kl=self.indexer_coeff > 0),
            freeze_indexers=self.indexer_coeff == 0.0, updates_per_step=self.rl.updates_per_iteration)
        self.gpt, self.ddp, self.tracker = self.parts.gpt, self.parts.ddp, self.parts.tracker
        self.optimizer, self.scheduler = self.parts.optimizer, self.parts.scheduler
        self.bf16 = self.plan.model.params_dtype == "bfloat16"
        self.checkpoints = CheckpointManager(self.stage_dir / "checkpoints", keep_last=cfg.checkpoint.keep_last,
                                             distributed_optimizer=cfg.parallel.distributed_optimizer)
        self.guard = NonFiniteGuard(cfg.train.max_nonfinite_steps)
        self.ref: torch.nn.Module | None = None
        self.prompts = PromptGenerator(self.rl.task.name, ByteTokenizer(), seed=cfg.train.seed,
                                       lengths=self.rl.task.lengths, digits=self.rl.task.digits,
                                       operations=self.rl.task.operations)
        self.tokenizer = ByteTokenizer()
        self.reward_fn = load_reward(self.rl.reward)
        self.step = 0  # GRPO iterations done (the stage's "step": rollout position)
        self.reward_failures = 0
        self.lineage: dict | None = None  # the checkpoint the stage (and its reference) starts from
        self.start = self._restore()

    # ------------------------------------------------------------------------------------------ checkpoints
    def layout(self) -> dict:
        """This run's parallel layout (RNG states are restored only under the same one)."""
        d = self.dims
        return {"world_size": d.world_size, "tp": d.tp, "cp": d.cp, "pp": d.pp, "dp": d.dp}

    def train_state(self) -> dict:
        """The JSON record saved with each checkpoint: the rollout position (prompts and sampler seeds are
        functions of ``step``), the reward-failure count, the reference's origin and the skipped updates."""
        return {"step": self.step, "stage": self.stage, "steps": self.plan.steps, "layout": self.layout(),
                "consumed_samples": self.step * self.rl.prompts_per_iteration, "seed": self.cfg.train.seed,
                "reward_failures": self.reward_failures, "reference_from": self.init_from, "lineage": self.lineage,
                "skipped_steps": self.guard.skipped}

    def save(self) -> Path:
        """Checkpoint model, optimizer, scheduler, train state and RNG at an iteration boundary (collective).

        Refuses non-finite weights (:class:`~dsa_dist.train.errors.NonFiniteError`)."""
        return self.checkpoints.save(self.parts, self.step, self.train_state())

    def _restore(self) -> str:
        """Start weights (init_from) -> reference model; then resume this stage's newest good checkpoint if any."""
        seed = self.cfg.train.seed
        if self.init_from is not None:
            self.lineage = lineage_of(self.init_from, verified(self.init_from))
            self.checkpoints.restore(self.parts, self.init_from, full=False, layout=self.layout(), seed=seed)
        if self.rl.loss.kl_coeff > 0:
            # The reference is the stage's starting policy, frozen, on the same ranks and TP shards.
            ref = build_model(self.plan.model, runtime=SPARSE_INFERENCE)  # no indexer KL: it never trains
            ref.load_state_dict(self.gpt.state_dict())
            self.ref = self._wrap(ref).eval()
            self.ref.requires_grad_(False)
        latest = self.checkpoints.latest_good() if self.cfg.checkpoint.resume else None
        if latest is None:
            return f"initialised from {self.init_from}" if self.init_from else "fresh start (random weights)"
        saved = ckpt.read_train_state(latest)
        self._check_reference(latest, saved)
        self.checkpoints.restore(self.parts, latest, full=True, layout=self.layout(), seed=seed)
        self.step = int(saved["step"])
        self.reward_failures = int(saved["reward_failures"])
        self.guard.skipped = int(saved.get("skipped_steps", 0))
        return f"resumed from {latest}"

    def _check_reference(self, latest: Path, saved: dict) -> None:
        """Refuse to resume a checkpoint trained against another reference (starting checkpoint) than this run's."""
        if "lineage" in saved:  # compare contents (digest), not paths
            recorded = (saved["lineage"] or {}).get("digest")
            same = recorded == (self.lineage or {}).get("digest")
        else:  # a checkpoint that recorded only the reference's path
            same = saved.get("reference_from") == self.init_from
        if not same:
            raise CheckpointError(
                f"checkpoint {latest} was trained against the reference {saved.get('reference_from')}, but this run "
                f"starts from {self.init_from} (a different checkpoint, or the same path re-trained since); resume "
                "with the same checkpoint.init_from / pipeline, or move the grpo stage's directory aside to start it "
                "again")

    def _wrap(self, gpt: torch.nn.Module) -> torch.nn.Module:
        """The reference as the policy runs: under Megatron's Float16Module for bf16."""
        if not self.bf16:
            return gpt
        from megatron.core.transformer.module import Float16Module

        return Float16Module(gpt.config, gpt)

    # ------------------------------------------------------------------------------------------ rollout
    def _rollout_generator(self) -> torch.Generator:
        """The sampler's generator of this iteration and DP rank: seeded from (seed, iteration, dp rank), so a
        resumed run samples exactly what the uninterrupted one would have."""
        seed = (self.cfg.train.seed * 1_000_003 + self.step) * 1_009 + self.dims.dp_rank
        return torch.Generator(device=self.device).manual_seed(seed % (2**63))

    @torch.no_grad()
    def rollout(self) -> tuple[RolloutBatch, dict]:
        """Prompts -> G samples each -> rewards -> advantages, for this DP rank; and the rollout metrics."""
        from dsa_dist.rl.rollout import generate, replay_topk

        rl, G = self.rl, self.rl.group_size
        local = rl.prompts_per_iteration // self.dims.dp
        prompts = self.prompts.batch(self.step * rl.prompts_per_iteration + self.dims.dp_rank * local, local)
        t0 = time.perf_counter()
        self.gpt.eval()
        with megatron_cpu_scope():
            out = generate(self.gpt, [p.tokens for p in prompts for _ in range(G)], self.params,
                           generator=self._rollout_generator(), record_topk=rl.replay_indexer_topk,
                           cuda_graph=rl.cuda_graph)
        self.gpt.train()
        rollout_time = time.perf_counter() - t0
        mask = out.response_mask
        n_resp = mask.shape[1]
        positions = out.prompt_lens.to(mask.device).long().unsqueeze(1) + torch.arange(n_resp, device=mask.device)
        tokens = out.tokens.to(self.device)
        response = tokens.gather(1, positions.to(self.device))
        pad = (-tokens.shape[1]) % self.dims.tp  # the indexer splits the query rows of a forward over TP ranks
        tokens = torch.nn.functional.pad(tokens, (0, pad), value=self.tokenizer.eod_id)  # [B, L]
        # Keep the indexer's choice: every row of the trainer's forward gets the indices the sampler used there.
        topk = replay_topk(out, seq_len=tokens.shape[1]) if rl.replay_indexer_topk else None  # {layer: [B, L, k]}
        texts = [self.tokenizer.decode(r[m].tolist()) for r, m in zip(response.cpu(), mask.cpu())]
        rewards, failures = score_responses(self.reward_fn, prompts, texts, G)  # [P, G] float64
        adv = group_advantages(rewards, scale_by_std=rl.loss.advantage_std, eps=rl.loss.advantage_eps)
        batch = RolloutBatch(tokens=tokens, positions=positions.to(self.device), response=response,
                             mask=mask.to(self.device).float(), sampler_logprobs=out.logprobs.to(self.device).float(),
                             kept=out.kept_mask.to(self.device), advantages=adv.flatten().float().to(self.device),
                             topk=topk)
        dropped_groups = 0
        if rl.loss.dynamic_sampling:
            keep_groups = nonzero_variance_groups(rewards)
            dropped_groups = int((~keep_groups).sum())
            batch = batch.select(keep_groups.repeat_interleave(G).to(self.device))
        stats = torch.tensor([rewards.sum(), (rewards * rewards).sum(), (rewards >= 1.0).sum(), rewards.numel(),
                              float(mask.sum()), float(len(failures)), float(dropped_groups), local],
                             dtype=torch.float64)
        stats = self._dp_sum(stats)
        self.reward_failures += int(stats[5])  # a run-wide count (the same on every rank, checkpointed)
        n = stats[3]
        mean = stats[0] / n
        metrics = {"reward/mean": float(mean), "reward/std": float((stats[1] / n - mean * mean).clamp_min(0).sqrt()),
                   "reward/accuracy": float(stats[2] / n), "reward/failures": float(self.reward_failures),
                   "rollout/response_length": float(stats[4] / n),
                   "rollout/dropped_group_fraction": float(stats[6] / stats[7]),
                   "perf/rollout_tokens_per_s": float(stats[4]) / max(rollout_time, 1e-9) / self.dims.dp}
        return batch, metrics

    def _dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group() if ps.model_parallel_is_initialized() else None

    def _dp_sum(self, x: torch.Tensor) -> torch.Tensor:
        if dist.is_initialized() and self.dims.dp > 1:
            x = x.to(self.device)
            dist.all_reduce(x, group=self._dp_group())
        return x.cpu()

    # ------------------------------------------------------------------------------------------ forward
    def _response_logprobs(self, model: torch.nn.Module, mb: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """log π(response) and entropy ``[b, N]`` under ``model``, restricted to the sampler's kept sets."""
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        # The policy (π_θ, π_old) replays the sampler's top-k when asked; the reference selects its own.
        replay = mb.topk if model is not self.ref else None
        get_indexer_loss_tracker(model).begin_forward(replay_topk=replay)
        logits = model(mb.tokens, None, None)  # [b, L, V/tp]
        logits = gather_from_tensor_model_parallel_region(logits)  # [b, L, V]
        # Token j of the response sits at positions[:, j]; the logits one position earlier predict it.
        idx = (mb.positions - 1).unsqueeze(-1).expand(-1, -1, logits.shape[-1])  # [b, N, V]
        return token_logprobs(logits.gather(1, idx), mb.response, mb.kept, self.params.temperature)

    @torch.no_grad()
    def _frozen_logprobs(self, model: torch.nn.Module, batch: RolloutBatch) -> torch.Tensor:
        """log π of the whole batch under ``model`` in eval mode (old policy or reference), micro-batched."""
        was_training = model.training
        model.eval()
        out = []
        with megatron_cpu_scope():
            for mb in self._micro_batches(batch):
                out.append(self._response_logprobs(model, mb)[0])
        model.train(was_training)
        return torch.cat(out) if out else batch.sampler_logprobs.clone()

    def _micro_batches(self, batch: RolloutBatch) -> list[RolloutBatch]:
        mbs = self.rl.micro_batch_size
        return [batch.rows(slice(i, i + mbs)) for i in range(0, batch.tokens.shape[0], mbs)]

    # ------------------------------------------------------------------------------------------ update
    def update(self, batch: RolloutBatch, old: torch.Tensor, ref: torch.Tensor | None,
               global_tokens: torch.Tensor) -> dict:
        """One optimizer step on the whole rollout batch (micro-batched); returns its reduced statistics."""
        from megatron.core.distributed import finalize_model_grads

        lo = self.rl.loss
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        sums = torch.zeros(9, dtype=torch.float64)
        loss_sum = torch.zeros((), dtype=torch.float64)
        mbs = self.rl.micro_batch_size
        with megatron_cpu_scope():
            for i, mb in enumerate(self._micro_batches(batch)):
                rows = slice(i * mbs, i * mbs + mb.tokens.shape[0])
                logp, entropy = self._response_logprobs(self.ddp, mb)
                terms: GRPOTerms = grpo_terms(
                    logp, old[rows], mb.sampler_logprobs, None if ref is None else ref[rows], entropy,
                    mb.advantages, mb.mask, global_tokens, eps_low=lo.eps_low, eps_high=lo.eps_high,
                    kl_coeff=lo.kl_coeff, opsm_delta=lo.opsm_delta)
                loss = terms.loss
                indexer_kl = torch.zeros(())
                if self.indexer_coeff > 0 and self.tracker.layers:
                    # The KL is a mean over this rank's rows: weight it by this micro-batch's share of tokens.
                    indexer_kl = self.tracker.total()
                    loss = loss + self.indexer_coeff * indexer_kl * (terms.tokens / global_tokens)
                loss.backward()
                loss_sum += loss.detach().double().cpu()
                sums += torch.stack([t.detach().double().cpu() for t in (
                    terms.policy_loss_sum, terms.kl_sum, terms.clipped_sum, terms.entropy_sum, terms.approx_kl_sum,
                    terms.abs_log_ratio_sum, terms.opsm_masked, terms.sequences, indexer_kl * terms.tokens)])
            finalize_model_grads([self.ddp])  # sums gradients over DP (per-token loss: no 1/dp scaling)
        # Non-finite guard: the same verdict on every rank (TP peers hold the same loss; DP ranks vote).
        loss_finite = float(self._dp_sum(torch.tensor([float(not torch.isfinite(loss_sum))],
                                                      dtype=torch.float64))[0]) == 0.0
        updated, grad_norm = optimizer_step(self.optimizer, self.cfg.optim.clip_grad, loss_finite=loss_finite)
        skipped = not (loss_finite and math.isfinite(grad_norm))
        if updated:  # a skipped update leaves the LR schedule where it was (as Megatron does)
            self.scheduler.step(1)
        self.guard.record(skipped)
        return {"sums": sums, "grad_norm": grad_norm, "updated": updated, "skipped": skipped}

    def train_iteration(self) -> dict:
        """Rollout + scoring + updates_per_iteration optimizer steps; returns the iteration's metrics."""
        batch, metrics = self.rollout()
        t0 = time.perf_counter()
        global_tokens = self._dp_sum(batch.mask.sum().double().reshape(1))[0].float().to(self.device)
        self.step += 1
        if float(global_tokens) == 0:  # every group was dropped by dynamic sampling: nothing to learn from
            return {"step": self.step, **metrics, "rl/skipped": 1.0}
        old_trainer = self._frozen_logprobs(self.ddp, batch)
        old = old_trainer if self.rl.loss.old_logprobs == "trainer" else batch.sampler_logprobs
        ref = self._frozen_logprobs(self.ref, batch) if self.ref is not None else None
        mismatch = self._dp_sum(torch.stack([((batch.sampler_logprobs - old_trainer).abs() * batch.mask).sum()])
                                .double().cpu())[0]
        sums = torch.zeros(9, dtype=torch.float64)
        grad_norm = 0.0
        skipped = 0
        for u in range(self.rl.updates_per_iteration):
            where = f"iteration {self.step}, update {u + 1} of {self.rl.updates_per_iteration}"
            res = self.update(batch, old, ref, global_tokens)
            sums += res["sums"]
            grad_norm = res["grad_norm"]
            skipped += int(res["skipped"])
            self.guard.check(where)
            if res["updated"] and not parameters_finite(self.gpt):
                # Finite gradients, but the update overflowed the weights (e.g. a huge LR): nothing can be sampled
                # from this policy and no later update can repair it. Stop before the next forward; the last
                # checkpoint holds finite weights.
                raise NonFiniteError(
                    f"training diverged: the update of GRPO {where} made the policy's weights non-finite "
                    f"(learning rate {group_lrs(self.optimizer)[0]}). Lower the learning rate "
                    f"(stages.{self.stage}.lr) or clip harder (optim.clip_grad), and resume from the last checkpoint "
                    "(every saved checkpoint holds finite weights)")
        if self.dims.tp > 1:  # TP ranks score disjoint indexer rows: their KL means average to the global one
            from megatron.core import parallel_state as ps

            kl = sums[8:9].to(self.device)
            dist.all_reduce(kl, group=ps.get_tensor_model_parallel_group())
            sums[8] = float(kl[0]) / self.dims.tp
        sums = self._dp_sum(sums)
        updates, tokens = self.rl.updates_per_iteration, float(global_tokens)
        per_token = sums / (tokens * updates)
        lr, indexer_lr = group_lrs(self.optimizer)
        train_tokens = float(self._dp_sum(torch.tensor([float(batch.tokens.numel())], dtype=torch.float64))[0])
        metrics |= {
            "step": self.step, "policy/loss": float(per_token[0]), "policy/kl_ref": float(per_token[1]),
            "policy/clip_fraction": float(per_token[2]), "policy/entropy": float(per_token[3]),
            "policy/approx_kl": float(per_token[4]),
            "policy/abs_log_ratio": float(per_token[5]),  # |log π_sampler − log π_θ|, mean over updates
            "policy/sampler_trainer_abs_log_ratio": float(mismatch) / tokens,  # |log π_sampler − log π_old|
            "policy/opsm_masked_fraction": float(sums[6] / sums[7]),
            "indexer_kl": float(per_token[8]) if self.indexer_coeff > 0 else None,
            "lr": lr, "indexer_lr": indexer_lr, "grad_norm": grad_norm,
            "perf/train_tokens_per_s": train_tokens * (updates + 2) / (time.perf_counter() - t0) / self.dims.dp,
            "skipped_updates": skipped,  # of this iteration (non-finite loss or grad norm; no update applied)
        }
        return metrics

    # ------------------------------------------------------------------------------------------ the stage
    @in_megatron_cpu_scope
    def run(self, until: int | None = None) -> list[dict]:
        """Run iterations until ``plan.steps`` (or stop at ``until``, with a checkpoint); returns the records."""
        cfg, plan = self.cfg, self.plan
        history: list[dict] = []
        if self.step >= plan.steps:
            return history
        log = MetricsLogger(self.stage_dir, self.stage, plan.steps, self.step, enabled=self.rank == 0,
                            tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress)
        rl = self.rl
        log.print(f"[{self.stage}] {self.start}: iteration {self.step}/{plan.steps}, {rl.prompts_per_iteration} "
                  f"prompts x {rl.group_size} samples, {rl.updates_per_iteration} updates/iteration, "
                  f"task {rl.task.name}, reward {rl.reward}, layout {self.layout()}")
        try:
            stop = plan.steps if until is None else min(until, plan.steps)
            while self.step < stop:
                rec = self.train_iteration()
                history.append(rec)
                log.advance(self.step)
                if self.heartbeat is not None:
                    self.heartbeat.step = self.step
                if rec.get("skipped_updates"):
                    log.print(f"[{self.stage}] iteration {self.step}: {rec['skipped_updates']} update(s) skipped "
                              f"(non-finite loss or grad norm; {self.guard.in_row} in a row, {self.guard.skipped} "
                              "in this stage)")
                    log.log(self.step, {"skipped_steps": self.guard.skipped}, quiet=True)
                if self.step % cfg.logging.log_interval == 0 or self.step == plan.steps:
                    log.log(self.step, {k: v for k, v in rec.items()
                                        if k not in ("step", "skipped_updates") and v is not None})
                last = self.step == plan.steps
                if last or self.step == stop or (cfg.checkpoint.interval and self.step % cfg.checkpoint.interval == 0):
                    log.print(f"[{self.stage}] saved {self.save()}")
        finally:
            log.close()
        return history
