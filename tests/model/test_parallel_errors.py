"""A bad parallel configuration fails on every rank with the documented ValueError, before a collective can hang."""

import torch

from tests._dist import run_distributed


def _catch(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _worker(rank, world):
    from dsa_dist.model.builder import build_model
    from dsa_dist.model.config import preset
    from dsa_dist.model.runtime import SPARSE_TRAIN
    from dsa_dist.parallel import init_parallel
    from tests.model._configs import model_config

    msgs = {}
    # 1. sizes that do not divide the world: raised before the process group even exists.
    msgs["world"] = _catch(lambda: init_parallel(tp=3, cp=1))
    init_parallel(tp=2, cp=2)
    # 2. TP that does not divide the heads: raised while building, before any layer runs.
    msgs["heads"] = _catch(lambda: build_model(model_config("tiny", num_heads=3), runtime=SPARSE_TRAIN))
    model = build_model(preset("tiny"), runtime=SPARSE_TRAIN)
    # 3. a sequence the zigzag CP split cannot shard (9 tokens per rank = 18, not a multiple of 2*cp = 4).
    tokens = torch.zeros(1, 9, dtype=torch.long)
    msgs["cp_len"] = _catch(lambda: model(tokens, None, None, labels=tokens))
    tokens = torch.zeros(1, 6, dtype=torch.long)  # global 12: a valid zigzag split, runs
    msgs["ok_len"] = _catch(lambda: model(tokens, None, None, labels=tokens))
    # 4. TP splits each rank's query rows for the indexer: an odd length under TP=2 (CP=1) is refused.
    init_parallel(tp=2, cp=1)
    model = build_model(preset("tiny-gqa"), runtime=SPARSE_TRAIN)
    tokens = torch.zeros(1, 7, dtype=torch.long)
    msgs["tp_len"] = _catch(lambda: model(tokens, None, None, labels=tokens))
    # The group is still healthy after the errors: a collective completes on every rank.
    t = torch.ones(1)
    torch.distributed.all_reduce(t)
    msgs["alive"] = t.item()
    return msgs


def test_bad_configurations_raise_on_every_rank():
    results = run_distributed(_worker, 4, init_process_group=False, timeout=180)
    for msgs in results:
        assert "world size 4 is not divisible by tp*cp*pp = 3*1*1" in msgs["world"]
        assert "num_heads=3 is not divisible by tensor-parallel size 2" in msgs["heads"]
        assert "seq_len=18 is not divisible by 2*cp=4" in msgs["cp_len"] and "pad" in msgs["cp_len"]
        assert msgs["ok_len"] is None
        assert "sequence length 7" in msgs["tp_len"] and "not divisible by tp=2" in msgs["tp_len"]
        assert msgs["alive"] == 4.0
