"""DSAModelConfig: presets, immutability, validation errors, OmegaConf compatibility; init_parallel's early size
checks; the CPU shims."""

from dataclasses import FrozenInstanceError, replace

import pytest
from omegaconf import OmegaConf

from dsa_dist.model.config import PRESET_NAMES, DSAModelConfig, preset
from dsa_dist.parallel import init_parallel, validate_parallel_sizes
from tests.model._configs import model_config


def test_presets_validate_and_shapes():
    for name in PRESET_NAMES:
        preset(name).validate()
    v32 = preset("v32-layer")
    assert (v32.num_heads, v32.mla.q_lora_rank, v32.mla.kv_lora_rank, v32.mla.qk_rope_dim) == (128, 1536, 512, 64)
    assert (v32.core_qk_dim, v32.core_v_dim, v32.kv_heads) == (576, 512, 1)
    assert (v32.indexer.heads, v32.indexer.head_dim, v32.indexer.topk) == (64, 128, 2048)
    assert v32.softmax_scale == pytest.approx((128 + 64) ** -0.5)
    for name in ("small", "small-gqa"):
        assert 100e6 <= preset(name).num_parameters() <= 300e6
    assert preset("tiny").attention == "mla" and preset("tiny-gqa").attention == "gqa"


def test_config_is_immutable_and_variants_are_replaced():
    cfg = preset("tiny")
    with pytest.raises(FrozenInstanceError):
        cfg.seq_len = 128
    with pytest.raises(FrozenInstanceError):
        cfg.indexer.topk = 8  # nested sections are frozen too
    assert not hasattr(cfg, "dsa_mode")  # what the layers compute is the runtime's choice, not the architecture's
    small = replace(cfg, seq_len=128, indexer=replace(cfg.indexer, topk=8))
    assert (small.seq_len, small.indexer.topk) == (128, 8)
    assert (preset("tiny").seq_len, preset("tiny").indexer.topk) == (64, 16)  # the preset is unchanged
    with pytest.raises(ValueError, match="unknown model preset"):
        preset("huge")


@pytest.mark.parametrize(
    "kwargs, tp, cp, match",
    [
        ({"num_heads": 6}, 4, 1, "num_heads=6 is not divisible by tensor-parallel size 4"),
        ({"gqa": {"num_kv_heads": 1}}, 2, 1, "gqa.num_kv_heads=1 is not divisible by tensor-parallel size 2"),
        ({"indexer": {"topk": 0}}, 1, 1, "indexer.topk must be a positive int"),
        ({"indexer": {"topk": 65}}, 1, 1, "indexer.topk=65 is larger than seq_len=64"),
        ({"seq_len": 36}, 1, 4, r"seq_len=36 is not divisible by 2\*cp=8.*pad"),
        ({"indexer": {"head_dim": 48}}, 1, 1, "power-of-two"),
        ({"indexer": {"rope_dim": 7}}, 1, 1, "indexer.rope_dim=7"),
        ({"attention": "mha"}, 1, 1, "attention must be one of"),
        ({"seq_len": 36, "indexer": {"topk": 8}}, 4, 2, r"seq_len/cp=18 is not divisible by tp=4"),
    ],
)
def test_validate_errors_name_the_field(kwargs, tp, cp, match):
    name = "tiny-gqa" if "gqa" in kwargs else "tiny"
    with pytest.raises(ValueError, match=match):
        model_config(name, **kwargs).validate(tp=tp, cp=cp)


def test_omegaconf_structured_roundtrip():
    schema = OmegaConf.structured(DSAModelConfig)
    merged = OmegaConf.merge(schema, {"attention": "gqa", "indexer": {"topk": 32}, "gqa": {"num_kv_heads": 4}})
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, DSAModelConfig) and cfg.indexer.topk == 32 and cfg.gqa.num_kv_heads == 4
    with pytest.raises(FrozenInstanceError):
        cfg.indexer.topk = 1  # to_object gives the frozen dataclasses back
    with pytest.raises(Exception, match="dsa_mode"):
        OmegaConf.merge(schema, {"dsa_mode": "sparse"})  # no longer an architecture field
    # A preset instance as the base (what the run config does): overrides land in a copy.
    merged = OmegaConf.merge(OmegaConf.structured(preset("tiny")), OmegaConf.from_dotlist(["indexer.topk=4"]))
    assert OmegaConf.to_object(merged).indexer.topk == 4 and preset("tiny").indexer.topk == 16


def test_parallel_size_errors_before_any_collective(monkeypatch):
    assert validate_parallel_sizes(8, 2, 2) == 2
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*cp\*pp = 2\*2\*1 = 4"):
        validate_parallel_sizes(6, 2, 2)
    with pytest.raises(ValueError, match="tp must be a positive int"):
        validate_parallel_sizes(4, 0, 1)
    # No process group exists and no rendezvous is attempted: the bad size fails first, instantly.
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="world size 3 is not divisible"):
        init_parallel(tp=2, cp=1)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CPU shims only apply without CUDA")
def test_cpu_shims_and_cuda_literals():
    import torch

    from dsa_dist.compat import apply_cpu_shims, cuda_literals_to_cpu

    assert apply_cpu_shims() and apply_cpu_shims()  # idempotent
    assert torch.cuda.current_device() == torch.device("cpu")
    torch.cuda.synchronize()  # a no-op instead of "Torch not compiled with CUDA enabled"
    assert torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
    with cuda_literals_to_cpu():
        made = [torch.zeros(2, device="cuda"), torch.tensor([1.0], device=torch.device("cuda", 0)),
                torch.ones(1).cuda(), torch.ones(1).to("cuda"), torch.ones(1).to(device="cuda")]
    assert all(t.device.type == "cpu" for t in made)
    with pytest.raises((RuntimeError, AssertionError)):
        torch.zeros(1, device="cuda")  # outside the context nothing is rewritten
