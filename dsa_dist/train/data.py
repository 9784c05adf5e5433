"""Training data: tokenizers, Megatron-Core indexed datasets (.bin/.idx), sequence packing and a resumable sampler.

The data side of training (docs/design.md#data-and-tasks). Documents are stored with Megatron-Core's
``megatron.core.datasets.indexed_dataset`` format, each document followed by an end-of-document token, so
the ``.bin`` file is one long token stream. Training samples are windows of ``seq_len + 1`` tokens cut from
that stream (inputs = window[:-1], labels = window[1:]) -- documents are packed back to back, no padding.

The sample order is a pure function of ``(seed, global sample index)``: epoch ``e`` is a permutation of the
windows drawn from ``numpy.random.default_rng([seed, e])``. The only data state a checkpoint needs is
therefore the number of samples consumed so far (``consumed_samples``), which stays meaningful when the
data-parallel size changes between save and load.

A sidecar ``<prefix>.json`` records the tokenizer, vocabulary size and end-of-document id of a dataset, so
training can check them against the model configuration.
"""

from __future__ import annotations

import json
import os
import socket
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDataset,
    IndexedDatasetBuilder,
    get_bin_path,
    get_idx_path,
)

from dsa_dist.train.tasks import TASKS, make_task_sample, min_seq_len

if TYPE_CHECKING:
    from dsa_dist.config import TrainRunConfig

BYTE_TOKENIZER = "byte"
STDLIB_CORPUS = "stdlib"


class Tokenizer(Protocol):
    """What training and the task generators need from a tokenizer."""

    name: str
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus an end-of-document token (256). Needs no files, works on any text."""

    name = BYTE_TOKENIZER
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` file; ``eod_token`` names the end-of-document token."""

    _EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "[SEP]")

    def __init__(self, path: str, eod_token: str | None = None) -> None:
        from tokenizers import Tokenizer as _HFTok

        if not Path(path).is_file():
            raise ValueError(f"tokenizer file {path!r} does not exist; pass a Hugging Face tokenizer.json "
                             f"or {BYTE_TOKENIZER!r}")
        self._tok = _HFTok.from_file(path)
        self.name = str(Path(path).resolve())
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        names = [eod_token] if eod_token else list(self._EOD_CANDIDATES)
        ids = [self._tok.token_to_id(n) for n in names]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(f"tokenizer {path!r} has none of the end-of-document tokens {names}; "
                             "pass --eod-token with the token your tokenizer uses")
        self.eod_id = int(found[0])

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids))


def load_tokenizer(spec: str, eod_token: str | None = None) -> Tokenizer:
    """``"byte"`` gives :class:`ByteTokenizer`; anything else is the path of a ``tokenizer.json``."""
    return ByteTokenizer() if spec == BYTE_TOKENIZER else HFTokenizer(spec, eod_token)


# ----------------------------------------------------------------------------------------------------------------
# Writing datasets
# ----------------------------------------------------------------------------------------------------------------


def write_indexed_dataset(documents: Iterable[str], prefix: str | Path, tokenizer: Tokenizer,
                          sources: list[str] | None = None) -> dict:
    """Tokenize ``documents`` into ``<prefix>.bin/.idx`` (+ ``<prefix>.json``); return the sidecar metadata.

    Files are written under temporary names and renamed at the end, so an interrupted run never leaves a
    dataset that looks complete.
    """
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    # A per-process temporary name: several nodes may build the same (shared) dataset at once.
    tmp = prefix.with_name(f"{prefix.name}.partial-{socket.gethostname()}-{os.getpid()}")
    tmp_files = [Path(get_bin_path(str(tmp))), Path(get_idx_path(str(tmp))), Path(str(tmp) + ".json")]
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    try:
        builder = IndexedDatasetBuilder(str(tmp_files[0]), dtype=dtype)
        n_docs = n_tokens = 0
        for text in documents:
            ids = tokenizer.encode(text)
            if not ids:
                continue
            ids.append(tokenizer.eod_id)  # the EOD token separates packed documents
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            n_docs += 1
            n_tokens += len(ids)
        builder.finalize(str(tmp_files[1]))
        if n_docs == 0:
            raise ValueError(f"no non-empty documents to write to {prefix}")
        meta = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "eod_id": tokenizer.eod_id,
                "documents": n_docs, "tokens": n_tokens, "sources": sources or []}
        tmp_files[2].write_text(json.dumps(meta, indent=1))
        # The sidecar goes last and marks the dataset complete: a stale one must not describe the new files.
        Path(str(prefix) + ".json").unlink(missing_ok=True)
        tmp_files[0].replace(get_bin_path(str(prefix)))
        tmp_files[1].replace(get_idx_path(str(prefix)))
        tmp_files[2].replace(str(prefix) + ".json")
    finally:
        for f in tmp_files:
            f.unlink(missing_ok=True)
    return meta


def stdlib_files(max_files: int = 0) -> list[Path]:
    """The Python standard library's ``.py`` files on this machine, sorted (the embedded default corpus)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    return files[:max_files] if max_files > 0 else files


def read_documents(files: Iterable[Path], json_key: str = "text") -> Iterator[str]:
    """One document per text file; one per line (field ``json_key``, a string) for ``.jsonl`` files.

    Bad input is a ``ValueError`` naming the file (and line): unreadable files, text that is not UTF-8, lines
    that are not JSON objects, a missing key or a value that is not a string (``null`` is not the text "None").
    """
    for f in files:
        try:
            if f.suffix == ".jsonl":
                yield from _jsonl_documents(f, json_key)
            else:
                yield f.read_text(encoding="utf-8", errors="replace")
        except OSError as err:
            raise ValueError(f"{f}: cannot read ({err.strerror or err})") from None


def _jsonl_documents(f: Path, json_key: str) -> Iterator[str]:
    with open(f, "rb") as fh:  # bytes, decoded per line: a decoding error then names its line
        for n, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise ValueError(f"{f}:{n}: not UTF-8 text ({err.reason}); convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{f}:{n}: invalid JSON ({err.msg} at column {err.colno}); each line of a "
                                 ".jsonl file must be one JSON object") from None
            if not isinstance(record, dict):
                raise ValueError(f"{f}:{n}: expected a JSON object with a {json_key!r} field, got "
                                 f"{type(record).__name__}")
            if json_key not in record:
                raise ValueError(f"{f}:{n}: JSON record has no key {json_key!r} (keys: {sorted(record)[:10]}; "
                                 "pick the text field with --json-key)")
            text = record[json_key]
            if not isinstance(text, str):
                kind = "null" if text is None else type(text).__name__
                raise ValueError(f"{f}:{n}: field {json_key!r} is {kind}, not a string; fix or drop that record")
            yield text


def stdlib_dataset_prefix(cache_dir: str | Path, max_files: int = 0) -> str:
    """Where :func:`ensure_stdlib_dataset` keeps the byte-tokenized stdlib corpus of this Python version."""
    return str(Path(cache_dir).expanduser() / (f"stdlib_py{sysconfig.get_python_version()}_byte"
                                               + (f"_{max_files}" if max_files else "")))


def ensure_stdlib_dataset(cache_dir: str | Path, max_files: int = 0) -> str:
    """Build (once) the byte-tokenized stdlib corpus under ``cache_dir``; return its path prefix."""
    prefix = stdlib_dataset_prefix(cache_dir, max_files)
    if not IndexedDataset.exists(prefix) or not Path(prefix + ".json").exists():
        files = stdlib_files(max_files)
        write_indexed_dataset(read_documents(files), prefix, ByteTokenizer(), sources=[str(files[0].parent)])
    return prefix


# ----------------------------------------------------------------------------------------------------------------
# Reading: packed windows and the deterministic sampler
# ----------------------------------------------------------------------------------------------------------------


def dataset_metadata(prefix: str) -> dict:
    """The sidecar metadata of a prepared dataset; a clear error when the dataset is missing or broken."""
    if not IndexedDataset.exists(prefix):
        raise ValueError(f"data.corpus={prefix!r}: no {prefix}.bin/.idx found; create it with "
                         f"`dsa-prepare-data --output {prefix} <files>` or use data.corpus={STDLIB_CORPUS}")
    meta_path = Path(prefix + ".json")
    if not meta_path.exists():
        raise ValueError(f"data.corpus={prefix!r}: {meta_path} is missing (the tokenizer record written by "
                         "dsa-prepare-data); re-run dsa-prepare-data")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"data.corpus={prefix!r}: {meta_path} is unreadable ({err}); re-run dsa-prepare-data")\
            from None
    missing = [k for k in ("tokenizer", "vocab_size", "eod_id") if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise ValueError(f"data.corpus={prefix!r}: {meta_path} lacks {missing}; re-run dsa-prepare-data")
    return meta


def open_indexed_dataset(prefix: str) -> IndexedDataset:
    """Open ``<prefix>.bin/.idx`` and check that they agree; ``ValueError`` naming the file when corrupt.

    Megatron's reader trusts the index: a truncated ``.bin`` or a damaged ``.idx`` would otherwise surface as
    an assertion, a crash or silently wrong tokens at some later step.
    """
    idx, bin_ = get_idx_path(prefix), get_bin_path(prefix)
    fix = "the dataset is corrupt or was not written by dsa-prepare-data; re-create it with dsa-prepare-data"
    try:
        ds = IndexedDataset(prefix)
    except Exception as err:  # noqa: BLE001 - any failure to parse the index means a corrupt dataset
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"{idx}: cannot read the index ({reason}); {fix}") from None
    index = ds.index
    lengths = np.asarray(index.sequence_lengths, dtype=np.int64)
    pointers = np.asarray(index.sequence_pointers, dtype=np.int64)
    itemsize = np.dtype(index.dtype).itemsize
    expected_ptr = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * itemsize if len(lengths) else pointers
    idx_size = Path(idx).stat().st_size
    header = 34 + 4 * len(lengths) + 8 * len(pointers) + 8 * int(index.document_count)  # int32, int64, int64
    if len(lengths) == 0 or (lengths <= 0).any() or not np.array_equal(pointers, expected_ptr) \
            or idx_size != header:
        raise ValueError(f"{idx}: the index is inconsistent ({len(lengths)} sequences, {idx_size} bytes); {fix}")
    need = int(lengths.sum()) * itemsize
    have = Path(bin_).stat().st_size
    if have != need:
        raise ValueError(f"{bin_}: {have} bytes, but its index describes {need} ({int(lengths.sum())} tokens of "
                         f"{itemsize} bytes); {fix}")
    return ds


class PackedWindows:
    """The documents of an indexed dataset end to end, cut into windows of ``seq_len + 1`` tokens."""

    def __init__(self, prefix: str, seq_len: int) -> None:
        self.prefix, self.seq_len = prefix, seq_len
        self.meta = dataset_metadata(prefix)
        self._ds = open_indexed_dataset(prefix)
        # Start offset of every document in the concatenated stream.
        self._doc_start = np.concatenate([[0], np.cumsum(self._ds.sequence_lengths, dtype=np.int64)])
        self.num_tokens = int(self._doc_start[-1])
        # Consecutive windows share one token (the last label of one is the first input of the next).
        self.num_windows = (self.num_tokens - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"data.corpus={prefix!r} has {self.num_tokens} tokens, fewer than one window of "
                             f"model.seq_len+1={seq_len + 1}; use a larger corpus or a smaller model.seq_len")

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> np.ndarray:
        """Window ``i``: tokens ``[i*seq_len, (i+1)*seq_len]`` of the stream, int64 ``[seq_len + 1]``."""
        start, stop = i * self.seq_len, (i + 1) * self.seq_len + 1
        doc = int(np.searchsorted(self._doc_start, start, side="right")) - 1
        pieces = []
        while start < stop:
            offset = start - int(self._doc_start[doc])
            take = min(stop - start, int(self._doc_start[doc + 1]) - start)
            pieces.append(self._ds.get(doc, offset=offset, length=take))
            start += take
            doc += 1
        return np.concatenate(pieces).astype(np.int64)


class SampleOrder:
    """Global sample index -> window index: a fresh seeded permutation of all windows every epoch."""

    def __init__(self, num_windows: int, seed: int) -> None:
        self.num_windows, self.seed = num_windows, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, global_index: int) -> int:
        epoch, i = divmod(global_index, self.num_windows)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        return int(self._perm[i])


@dataclass
class Batch:
    """One micro-batch, full sequence (before context-parallel sharding); all tensors ``[b, seq_len]``."""

    tokens: torch.Tensor  # int64 inputs
    labels: torch.Tensor  # int64 next tokens
    loss_mask: torch.Tensor  # float32, 1 where the LM loss counts
    sample_ids: torch.Tensor  # int64 [b], global sample index of each row (for checking the data order)


def make_batch(windows: list[np.ndarray], masks: list[np.ndarray], sample_ids: list[int]) -> Batch:
    """Stack ``seq_len + 1`` windows into inputs/labels; ``masks`` are per-label loss masks ``[seq_len]``."""
    w = torch.from_numpy(np.stack(windows))
    return Batch(tokens=w[:, :-1].contiguous(), labels=w[:, 1:].contiguous(),
                 loss_mask=torch.from_numpy(np.stack(masks)).float(), sample_ids=torch.tensor(sample_ids))


class DataStream:
    """The micro-batches one data-parallel rank trains on, a pure function of ``(seed, consumed_samples)``.

    A global batch of ``global_batch_size`` samples starting at global sample ``c`` is split into
    ``num_microbatches`` micro-batches of ``micro_batch_size * dp_size`` samples; rank ``r`` takes rows
    ``r * micro_batch_size ...`` of each. With ``task_fraction > 0`` a seeded share of the samples is replaced
    by a generated long-context task (:mod:`dsa_dist.train.tasks`) whose haystack is that sample's window.
    """

    def __init__(self, windows: PackedWindows, tokenizer: Tokenizer, *, seed: int, micro_batch_size: int,
                 num_microbatches: int, dp_rank: int = 0, dp_size: int = 1, task_fraction: float = 0.0,
                 tasks: tuple[str, ...] = (), consumed_samples: int = 0) -> None:
        self.windows, self.tokenizer, self.seed = windows, tokenizer, seed
        self.micro_batch_size, self.num_microbatches = micro_batch_size, num_microbatches
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.task_fraction, self.tasks = task_fraction, tuple(tasks)
        self.consumed_samples = consumed_samples
        self._order = SampleOrder(len(windows), seed)

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.dp_size * self.num_microbatches

    def sample(self, g: int) -> tuple[np.ndarray, np.ndarray]:
        """Global sample ``g``: (window ``[seq_len+1]``, loss mask ``[seq_len]``)."""
        window = self.windows[self._order(g)]
        seq_len = self.windows.seq_len
        if self.task_fraction > 0:
            rng = np.random.default_rng([self.seed, 1, g])  # stream 1: task mix, independent of the order
            if rng.random() < self.task_fraction:
                task = self.tasks[int(rng.integers(len(self.tasks)))]
                window = make_task_sample(task, rng, window, seq_len, self.tokenizer).window
        return window, np.ones(seq_len, dtype=np.float32)

    def next_global_batch(self) -> list[Batch]:
        """This rank's ``num_microbatches`` micro-batches of the next global batch; advances the position."""
        start, mbs, dp = self.consumed_samples, self.micro_batch_size, self.dp_size
        micro = []
        for m in range(self.num_microbatches):
            ids = [start + m * mbs * dp + self.dp_rank * mbs + j for j in range(mbs)]
            windows, masks = zip(*(self.sample(g) for g in ids))
            micro.append(make_batch(list(windows), list(masks), ids))
        self.consumed_samples += self.global_batch_size
        return micro

    def state_dict(self) -> dict:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict) -> None:
        self.consumed_samples = int(state["consumed_samples"])


def eval_batches(windows: PackedWindows, tokenizer: Tokenizer, task: str, num_samples: int, batch_size: int,
                 seed: int) -> list[tuple[Batch, torch.Tensor]]:
    """A fixed eval set of ``task``: ``(batch, answer_mask [b, seq_len])`` pairs, identical on every rank."""
    order = SampleOrder(len(windows), seed + 7919)  # haystacks from another permutation than training's first
    out = []
    for b0 in range(0, num_samples, batch_size):
        ids = list(range(b0, min(b0 + batch_size, num_samples)))
        samples = [make_task_sample(task, np.random.default_rng([seed, 2, TASKS.index(task), i]),
                                    windows[order(i)], windows.seq_len, tokenizer) for i in ids]
        batch = make_batch([s.window for s in samples], [np.ones(windows.seq_len, np.float32)] * len(ids), ids)
        out.append((batch, torch.from_numpy(np.stack([s.answer_mask for s in samples]))))
    return out


def open_corpus(data_cfg) -> tuple[str, Tokenizer]:
    """Resolve ``data.corpus`` to a dataset prefix and its tokenizer, building the stdlib corpus if needed.

    With several processes, local rank 0 of each node builds the stdlib corpus while the others wait at a
    barrier (one build per machine, no concurrent writers).
    """
    import torch.distributed as dist

    if data_cfg.corpus != STDLIB_CORPUS:
        meta = dataset_metadata(data_cfg.corpus)
        return data_cfg.corpus, load_tokenizer(meta["tokenizer"])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        prefix = ensure_stdlib_dataset(data_cfg.cache_dir, data_cfg.stdlib_max_files)
    if dist.is_initialized():
        dist.barrier()
    prefix = ensure_stdlib_dataset(data_cfg.cache_dir, data_cfg.stdlib_max_files)
    return prefix, ByteTokenizer()


def check_data(cfg: TrainRunConfig) -> None:
    """The checks of a run config that need the data on disk; ``ValueError`` naming the key and the fix.

    Run once by ``dsa-train`` before training starts (config validation itself does no I/O): the corpus exists
    and is intact, it holds at least one sequence of ``model.seq_len + 1`` tokens, ``model.vocab_size`` covers
    the tokenizer, and ``model.seq_len`` fits every task in use. The stdlib corpus is built here if missing
    (by local rank 0 only when several processes start at once; the others then skip the corpus-size check).
    """
    d, m = cfg.data, cfg.model
    if d.corpus == STDLIB_CORPUS:
        tok: Tokenizer | None = ByteTokenizer()
        prefix = stdlib_dataset_prefix(d.cache_dir, d.stdlib_max_files)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            ensure_stdlib_dataset(d.cache_dir, d.stdlib_max_files)
        vocab = ByteTokenizer.vocab_size
        built = IndexedDataset.exists(prefix) and Path(prefix + ".json").exists()
    else:
        prefix = d.corpus
        meta = dataset_metadata(prefix)
        vocab = int(meta["vocab_size"])
        needs_tok = d.task_fraction > 0 or bool(d.eval_tasks)
        tok = load_tokenizer(meta["tokenizer"]) if needs_tok else None
        built = True
    if m.vocab_size < vocab:
        raise ValueError(f"model.vocab_size={m.vocab_size}: smaller than the tokenizer vocabulary ({vocab}) of "
                         f"data.corpus={d.corpus!r}; use >= {vocab} (a multiple of parallel.tp={cfg.parallel.tp})")
    needed = set(d.eval_tasks) | (set(d.tasks) if d.task_fraction > 0 else set())
    for task in sorted(needed):
        need = min_seq_len(task, tok)
        if m.seq_len < need:
            raise ValueError(f"model.seq_len={m.seq_len}: too short for the {task!r} task (needs >= {need}); raise "
                             f"it or drop {task!r} from data.tasks/data.eval_tasks")
    if built:
        dataset = open_indexed_dataset(prefix)  # kept alive while its (memory-mapped) index is read
        tokens = int(np.asarray(dataset.sequence_lengths, dtype=np.int64).sum())
        del dataset
        if tokens < m.seq_len + 1:
            raise ValueError(f"data.corpus={d.corpus!r} holds {tokens} tokens, fewer than one training sequence "
                             f"(model.seq_len+1 = {m.seq_len + 1}); add documents or lower model.seq_len")
