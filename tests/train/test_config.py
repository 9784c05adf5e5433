"""Config loading and validation (dsa_dist/config.py): every bad case fails at load with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsa_dist.config import DEFAULT_CONFIG, TrainRunConfig, load_config, stage_value
from dsa_dist.model.runtime import DSARuntime
from dsa_dist.train.stages import resolve_stage

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CPU = ["train.device=cpu", "model.params_dtype=float32"]


def test_tiny_yaml_is_the_default_and_valid():
    assert DEFAULT_CONFIG == CONFIGS / "tiny.yaml"
    cfg = load_config(DEFAULT_CONFIG, world_size=1)
    assert isinstance(cfg, TrainRunConfig)
    assert cfg.pipeline == ["dense", "warmup", "sparse"]
    assert cfg.model.vocab_size == 260 and cfg.model.seq_len == 256 and cfg.model.num_layers == 2
    assert cfg.parallel.dp == 1  # derived


@pytest.mark.parametrize("name,world", [("single_gpu.yaml", 1), ("v32_128k_multinode.yaml", 128)])
def test_gpu_configs_load(name, world, tmp_path):
    overrides = list(CPU)
    if name.startswith("v32"):  # its corpus lives on a cluster; stand in the stdlib corpus to validate the rest
        overrides += ["data.corpus=stdlib"]
    cfg = load_config(CONFIGS / name, overrides, world_size=world)
    assert cfg.parallel.tp * cfg.parallel.cp * cfg.parallel.dp == world
    for stage in cfg.pipeline:
        plan = resolve_stage(cfg, stage)
        assert plan.global_batch_size == plan.micro_batch_size * cfg.parallel.dp * plan.num_microbatches


def test_dotlist_overrides_and_stage_inheritance():
    cfg = load_config(DEFAULT_CONFIG, ["train.steps=50", "stages.warmup.steps=7", "optim.lr=0.01",
                                       "parallel.cp=2", "parallel.dp=1"], world_size=2)
    assert cfg.train.steps == 50 and cfg.parallel.cp == 2
    assert stage_value(cfg, "dense", "steps") == 50  # unset -> inherits train.steps
    assert stage_value(cfg, "warmup", "steps") == 7  # its own value wins
    assert stage_value(cfg, "dense", "lr") == 0.01
    warm = resolve_stage(cfg, "warmup")
    assert warm.spec.trains == "indexer" and warm.runtime == DSARuntime(attention="dense", indexer_kl=True)
    assert warm.indexer_lr == warm.lr == 1e-3  # warm-up: the indexers train at the stage lr
    sparse = resolve_stage(cfg, "sparse")
    assert sparse.runtime == DSARuntime(attention="sparse", indexer_kl=True)
    assert sparse.indexer_lr == 1e-3 and sparse.lr == 1e-3
    assert resolve_stage(cfg, "dense").runtime == DSARuntime(attention="dense", indexer_kl=False)
    assert sparse.model is cfg.model  # stages share the immutable model config


def test_model_preset_switch():
    cfg = load_config(DEFAULT_CONFIG, ["model_preset=tiny-gqa"], world_size=1)
    assert cfg.model.attention == "gqa" and cfg.model.seq_len == 256  # YAML fields still override the preset


@pytest.mark.parametrize("overrides,world,needles", [
    (["train.stepz=3"], 1, ["train.stepz", "unknown", "steps"]),
    (["bogus=1"], 1, ["bogus", "top level"]),
    (["model.indexer.topkk=3"], 1, ["model.indexer.topkk", "topk"]),
    (["train.steps=abc"], 1, ["train.steps", "abc"]),
    (["optim.lr=[1]"], 1, ["optim.lr"]),
    (["train.device=tpu"], 1, ["train.device", "tpu"]),
    (["pipeline=[dense,pretrain]"], 1, ["pipeline", "pretrain"]),
    (["parallel.dp=2"], 1, ["parallel.dp=2", "world size 1", "tp*cp*pp*dp"]),
    (["parallel.tp=2"], 3, ["tp*cp*pp", "world size 3"]),
    (["parallel.cp=3", "parallel.dp=1"], 3, ["model.seq_len=256", "2*parallel.cp=6"]),
    (["model.indexer.topk=300"], 1, ["model.indexer.topk=300", "seq_len=256"]),
    (["train.global_batch_size=5"], 1, ["global_batch_size", "multiple of micro_batch_size*dp"]),
    (["parallel.tp=3", "model.num_heads=4"], 3, ["num_heads=4", "tensor-parallel"]),
    (["model.vocab_size=128"], 1, ["model.vocab_size=128", "257"]),
    (["model.seq_len=128"], 1, ["model.seq_len=128", "multikey"]),
    (["data.tasks=[passkey,sorting]"], 1, ["data.tasks", "sorting"]),
    (["data.task_fraction=1.5"], 1, ["data.task_fraction=1.5", "[0, 1]"]),
    (["stages.warmup.warmup_steps=60"], 1, ["stages.warmup.warmup_steps", "60", "steps=60"]),
    (["stages.sparse.min_lr=1.0"], 1, ["stages.sparse.min_lr", "lr=0.001"]),
    (["pipeline=[sparse,dense]"], 1, ["pipeline", "order"]),
    (["model.params_dtype=bfloat16", "train.device=cpu"], 1, ["model.params_dtype", "float32"]),
    (["data.corpus=/nonexistent/corpus"], 1, ["data.corpus", "dsa-prepare-data"]),
    (["checkpoint.keep_last=0"], 1, ["checkpoint.keep_last"]),
    (["parallel.pp=2", "parallel.dp=1"], 2, ["parallel.pp=2"]),
    (["model_preset=huge"], 1, ["model_preset", "huge", "tiny"]),
    (["train.steps"], 1, ["key=value"]),
])
def test_bad_config_raises_value_error_naming_the_key(overrides, world, needles):
    with pytest.raises(ValueError) as info:
        load_config(DEFAULT_CONFIG, overrides, world_size=world)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


def test_bad_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  micro_batch_size: two\n")
    with pytest.raises(ValueError, match=r"bad\.yaml.*train\.micro_batch_size"):
        load_config(bad, world_size=1)
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.yaml", world_size=1)
