"""The ``parallel`` section of a run config: how many processes split the model and the data, and how."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Process layout: world size = tp * cp * pp * dp (docs/design.md#parallel-layout)."""

    tp: int = 1
    """Tensor-parallel size (splits attention heads, MLP and vocabulary)."""
    cp: int = 1
    """Context-parallel size (zigzag split of the sequence; needs model.seq_len % (2*cp) == 0)."""
    pp: int = 1
    """Pipeline-parallel size (dsa-train supports 1)."""
    dp: int = 0
    """Data-parallel size; 0 derives it from the world size (world_size / (tp*cp*pp)) when the config is loaded."""
    distributed_optimizer: bool = False
    """Shard optimizer state over DP (Megatron DistributedOptimizer, CUDA only); checkpoints stay reshardable."""
    timeout_s: float = 1800.0
    """Collective timeout in seconds: a rank that waits this long for a peer stops the run with an error naming
    the rank(s) that stopped responding (per-rank heartbeats in <run_dir>/.heartbeat). Keep it above the longest
    step + checkpoint save."""

    @property
    def world_size(self) -> int:
        """Processes the layout needs (valid once ``dp`` is resolved, i.e. after :func:`load_config`)."""
        return self.tp * self.cp * self.pp * self.dp

    @property
    def model_parallel_size(self) -> int:
        """Processes that hold one copy of the model: tp * cp * pp."""
        return self.tp * self.cp * self.pp
