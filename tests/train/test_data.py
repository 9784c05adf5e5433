"""Data pipeline (dsa_dist/train/data.py, tasks.py, prepare_data.py) against independent numpy/text references."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from dsa_dist.train import data as D
from dsa_dist.train.prepare_data import main as prepare_main
from dsa_dist.train.tasks import TASKS, make_task_sample, min_seq_len


def _write_corpus(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n" * 20)
    (tmp_path / "b.txt").write_text("zweites Dokument: äöü " * 15)
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"text": f"record {i} " * (i + 3)}) for i in range(4)))
    return ["hello world\n" * 20, "zweites Dokument: äöü " * 15] + [f"record {i} " * (i + 3) for i in range(4)]


def test_prepare_data_byte_tokenizer_roundtrip(tmp_path):
    docs = _write_corpus(tmp_path)
    out = tmp_path / "ds" / "corpus"
    rc = prepare_main([str(tmp_path / "a.txt"), str(tmp_path / "b.txt"), str(tmp_path / "c.jsonl"),
                       "--output", str(out)])
    assert rc == 0
    meta = json.loads((tmp_path / "ds" / "corpus.json").read_text())
    assert meta["tokenizer"] == "byte" and meta["eod_id"] == 256 and meta["documents"] == len(docs)
    expected = np.concatenate([np.frombuffer(d.encode(), np.uint8).astype(np.int64).tolist() + [256] for d in docs])
    assert meta["tokens"] == len(expected)
    ds = D.IndexedDataset(str(out))
    got = np.concatenate([ds[i] for i in range(len(ds))]).astype(np.int64)
    np.testing.assert_array_equal(got, expected)

    seq = 37
    windows = D.PackedWindows(str(out), seq)
    assert len(windows) == (len(expected) - 1) // seq
    for i in [0, 1, len(windows) // 2, len(windows) - 1]:  # windows cross document boundaries
        np.testing.assert_array_equal(windows[i], expected[i * seq:(i + 1) * seq + 1])


def test_prepare_data_hf_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers

    words = ["hello", "world", "record", "0", "1", "2", "3"]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "x.txt").write_text("hello world hello")
    (tmp_path / "docs" / "y.md").write_text("record 3 world")
    (tmp_path / "docs" / "skip.bin").write_text("hello")
    out = tmp_path / "hf"
    assert prepare_main([str(tmp_path / "docs"), "--output", str(out), "--tokenizer",
                         str(tmp_path / "tokenizer.json")]) == 0
    meta = json.loads((tmp_path / "hf.json").read_text())
    eod = tok.token_to_id("<|endoftext|>")
    assert meta["eod_id"] == eod and meta["vocab_size"] == len(words) + 2 and meta["documents"] == 2
    ds = D.IndexedDataset(str(out))
    assert ds[0].tolist() == [1, 2, 1, eod] and ds[1].tolist() == [3, 7, 2, eod]  # sorted paths: x.txt, y.md


def test_prepare_data_errors(tmp_path, capsys):
    assert prepare_main(["--output", str(tmp_path / "o"), str(tmp_path / "missing.txt")]) == 2
    assert "neither a file nor a directory" in capsys.readouterr().err
    assert prepare_main(["--output", str(tmp_path / "o"), "--tokenizer", str(tmp_path / "nope.json"),
                         "--stdlib", "--max-files", "1"]) == 2
    assert "tokenizer file" in capsys.readouterr().err
    assert prepare_main(["--output", "/proc/dsa-no-such-dir/ds", "--stdlib", "--max-files", "1"]) == 2
    assert "cannot write /proc/dsa-no-such-dir/ds" in capsys.readouterr().err


def test_stdlib_corpus(tmp_path):
    files = D.stdlib_files(3)
    prefix = D.ensure_stdlib_dataset(tmp_path, max_files=3)
    ds = D.IndexedDataset(prefix)
    assert len(ds) == 3
    first = files[0].read_text(encoding="utf-8", errors="replace").encode("utf-8")
    assert ds[0].tolist() == list(first) + [256]
    assert D.ensure_stdlib_dataset(tmp_path, max_files=3) == prefix  # cached


def test_sample_order_is_a_seeded_permutation_per_epoch():
    order = D.SampleOrder(50, seed=7)
    epoch0 = [order(g) for g in range(50)]
    epoch1 = [order(g) for g in range(50, 100)]
    assert sorted(epoch0) == list(range(50)) and sorted(epoch1) == list(range(50)) and epoch0 != epoch1
    assert [D.SampleOrder(50, seed=7)(g) for g in range(100)] == epoch0 + epoch1
    assert [D.SampleOrder(50, seed=8)(g) for g in range(50)] != epoch0


@pytest.fixture(scope="module")
def stdlib_windows(tmp_path_factory):
    prefix = D.ensure_stdlib_dataset(tmp_path_factory.mktemp("stdlib"), max_files=20)
    return D.PackedWindows(prefix, 256)


def _stream(windows, **kw):
    base = dict(seed=3, micro_batch_size=2, num_microbatches=2, task_fraction=0.5, tasks=TASKS)
    return D.DataStream(windows, D.ByteTokenizer(), **(base | kw))


def test_data_stream_dp_split_and_resume(stdlib_windows):
    single = _stream(stdlib_windows, micro_batch_size=4, num_microbatches=2)
    ranks = [_stream(stdlib_windows, dp_rank=r, dp_size=2) for r in range(2)]
    for _ in range(3):
        full = single.next_global_batch()
        parts = [s.next_global_batch() for s in ranks]
        ids_full = sorted(int(i) for b in full for i in b.sample_ids)
        ids_dp = sorted(int(i) for p in parts for b in p for i in b.sample_ids)
        assert ids_full == ids_dp  # DP=2 sees exactly the global batch of DP=1
        rows = {int(i): b.tokens[j] for b in full for j, i in enumerate(b.sample_ids)}
        for p in parts:
            for b in p:
                for j, i in enumerate(b.sample_ids):
                    assert np.array_equal(rows[int(i)], b.tokens[j])
                    np.testing.assert_array_equal(b.labels[j][:-1], b.tokens[j][1:])
    resumed = _stream(stdlib_windows, dp_rank=1, dp_size=2)
    resumed.load_state_dict(ranks[1].state_dict())
    a, b = ranks[1].next_global_batch(), resumed.next_global_batch()
    for x, y in zip(a, b):
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.sample_ids, y.sample_ids)


_QUESTION = {"passkey": r"The pass key is (\d+)\. Remember it\. \1 is the pass key\."}
_NEEDLES = {
    "passkey": r"\nThe pass key is \d{5}\. Remember it\. \d{5} is the pass key\.\n|"
               r"\nWhat is the pass key\? The pass key is \d{5}\.$",
    "multikey": r"\nThe pass key for [a-z]+ is \d{5}\.\n|\nWhat is the pass key for [a-z]+\? It is \d{5}\.$",
    "assoc": r"( [a-z]{3}:\d{3})+\n[a-z]{3}: \d{3}$",
}


@pytest.mark.parametrize("task", TASKS)
def test_task_answer_is_retrievable_from_the_context(task, stdlib_windows):
    tok = D.ByteTokenizer()
    for seed in range(5):
        filler = stdlib_windows[seed]
        s = make_task_sample(task, np.random.default_rng(seed), filler, 256, tok)
        assert s.window.shape == (257,) and s.answer_mask.shape == (256,)
        answer = tok.decode(s.window[1:][s.answer_mask > 0])
        context = tok.decode(s.window[: 257 - int(s.answer_mask.sum())])
        if task == "passkey":
            key = re.search(_QUESTION[task], context).group(1)
            assert answer == f" {key}." and context.endswith("What is the pass key? The pass key is")
        elif task == "multikey":
            name = re.search(r"What is the pass key for (\w+)\? It is$", context).group(1)
            keys = dict(re.findall(r"The pass key for (\w+) is (\d+)\.", context))
            assert len(keys) == 4 and answer == f" {keys[name]}."
        else:
            asked = re.search(r"\n(\w{3}):$", context).group(1)
            pairs = dict(re.findall(r" ([a-z]{3}):(\d{3})", context))
            assert answer == f" {pairs[asked]}" and len(pairs) > 10
        # Take the needles, question and answer out again: what is left is the start of the corpus filler.
        as_str = "".join(map(chr, s.window))  # one char per token (EOD included), so regexes work on tokens
        rest = re.sub(_NEEDLES[task], "", as_str)
        assert rest == "".join(map(chr, filler[: len(rest)])) and len(rest) == 257 - s.content_len
    assert min_seq_len(task, tok) <= 256
    with pytest.raises(ValueError, match="too short"):
        make_task_sample(task, np.random.default_rng(0), stdlib_windows[0], 8, tok)


@pytest.mark.parametrize("line,needles", [
    ('{"text": null}', ["bad.jsonl:2", "'text' is null, not a string"]),
    ('{"text": 5}', ["bad.jsonl:2", "'text' is int, not a string"]),
    ('{"text": {"a": 1}}', ["bad.jsonl:2", "'text' is dict, not a string"]),
    ('{"text": "ok", ', ["bad.jsonl:2", "invalid JSON"]),
    ('["a list"]', ["bad.jsonl:2", "expected a JSON object"]),
    ('{"body": "x"}', ["bad.jsonl:2", "no key 'text'", "body", "--json-key"]),
])
def test_prepare_data_bad_jsonl_names_file_and_line(tmp_path, capsys, line, needles):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "first document"}\n' + line + "\n")
    out = tmp_path / "out" / "ds"
    assert prepare_main([str(src), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dsa-prepare-data: ")
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing half-written


def test_prepare_data_non_utf8_jsonl(tmp_path, capsys):
    src = tmp_path / "latin.jsonl"
    src.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    assert prepare_main([str(src), "--output", str(tmp_path / "ds")]) == 2
    assert "latin.jsonl:2: not UTF-8" in capsys.readouterr().err


def _small_dataset(tmp_path, text="abcdefghij" * 10):
    (tmp_path / "doc.txt").write_text(text)
    prefix = tmp_path / "ds"
    assert prepare_main([str(tmp_path / "doc.txt"), "--output", str(prefix)]) == 0
    return str(prefix)


@pytest.mark.parametrize("damage,needle", [
    ("truncate_bin", ".bin: 60 bytes, but its index describes 202 (101 tokens"),
    ("extend_bin", ".bin: 212 bytes, but its index describes 202"),
    ("garbage_idx", ".idx: cannot read the index"),
    ("truncate_idx", ".idx: "),
    ("bad_json", ".json is unreadable"),
])
def test_corrupt_dataset_is_detected_at_open(tmp_path, damage, needle):
    prefix = _small_dataset(tmp_path)
    bin_, idx = tmp_path / "ds.bin", tmp_path / "ds.idx"
    if damage == "truncate_bin":
        bin_.write_bytes(bin_.read_bytes()[:60])
    elif damage == "extend_bin":
        bin_.write_bytes(bin_.read_bytes() + b"\0" * 10)
    elif damage == "garbage_idx":
        idx.write_bytes(b"\x17" * 64)
    elif damage == "truncate_idx":
        idx.write_bytes(idx.read_bytes()[:40])
    else:
        (tmp_path / "ds.json").write_text("{not json")
    with pytest.raises(ValueError) as info:
        D.PackedWindows(prefix, 16)
    assert needle in str(info.value) and "dsa-prepare-data" in str(info.value), str(info.value)


def _data_cfg(tmp_path, corpus, *overrides):
    from dsa_dist.config import DEFAULT_CONFIG, load_config

    return load_config(DEFAULT_CONFIG, [f"data.corpus={corpus}", f"run_dir={tmp_path / 'run'}", *overrides],
                       world_size=1)


def test_check_data_corpus_too_short(tmp_path):
    prefix = _small_dataset(tmp_path)  # 100 bytes + EOD = 101 tokens
    no_tasks = ["data.eval_tasks=[]", "data.task_fraction=0", "model.indexer.topk=16"]
    cfg = _data_cfg(tmp_path, prefix, *no_tasks, "model.seq_len=128")
    with pytest.raises(ValueError, match=r"holds 101 tokens, fewer than one training sequence.*129"):
        D.check_data(cfg)
    with pytest.raises(ValueError, match="fewer than one window"):
        D.PackedWindows(prefix, 128)  # the reader refuses too (a second line of defence)
    D.check_data(_data_cfg(tmp_path, prefix, *no_tasks, "model.seq_len=96"))


@pytest.mark.parametrize("overrides,needles", [
    (["model.vocab_size=128"], ["model.vocab_size=128", "257"]),
    (["model.seq_len=128"], ["model.seq_len=128", "multikey"]),
])
def test_check_data_vocab_and_task_length(tmp_path, overrides, needles):
    cfg = _data_cfg(tmp_path, "stdlib", "data.stdlib_max_files=3", f"data.cache_dir={tmp_path / 'cache'}",
                    *overrides)
    with pytest.raises(ValueError) as info:
        D.check_data(cfg)
    for needle in needles:
        assert needle in str(info.value)
