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
