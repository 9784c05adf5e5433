"""Generated long-context retrieval tasks: passkey, multi-key needle retrieval and associative recall.

The long-context task mix and evals of training (docs/design.md#data-and-tasks). Each task sample is a window of exactly
``seq_len + 1`` tokens whose *last* tokens are the answer, so accuracy needs only one forward pass: a sample
is solved when the argmax prediction at every answer position equals the answer token (teacher forcing).
Haystacks are real corpus text (a training window), so the needle must be found by content, not by format.

- ``passkey``: one "The pass key is 48213" needle at a random depth; the question asks for it.
- ``multikey``: four named keys at random depths; the question asks for one of them by name.
- ``assoc``: associative recall over many ``key:value`` pairs of random letters/digits; the question repeats
  one key and the answer is its value (keys are unique, values random, so only retrieval solves it).

Everything is a pure function of a ``numpy.random.Generator``, so the training mix and the eval sets are
reproducible from the seed.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from dsa_dist.config.train import TASK_NAMES

if TYPE_CHECKING:  # only the protocol; importing data.py here would be circular
    from dsa_dist.train.data import Tokenizer

TASKS: tuple[str, ...] = TASK_NAMES  # the config names them (data.tasks); each has a generator below
_MAX_PAIRS = 4000  # well below the 26**3 possible keys, so drawing unique keys stays fast
_NAMES = ("apple", "river", "stone", "cloud", "maple", "tiger", "amber", "delta", "orbit", "cedar")


@dataclass
class TaskSample:
    """A task window and which labels are the answer."""

    window: np.ndarray  # int64 [seq_len + 1]
    answer_mask: np.ndarray  # float32 [seq_len], 1 at the label positions of the answer tokens
    content_len: int  # tokens that are not filler (needles, question, answer)


def _digits(rng: np.random.Generator, n: int) -> str:
    return "".join(str(d) for d in rng.integers(0, 10, size=n))


def _assemble(pieces: list[list[int]], cuts: list[int], filler: np.ndarray, question: list[int],
              answer: list[int], seq_len: int, task: str) -> TaskSample:
    """Interleave filler and needles: filler[c_0:c_1] needle_0 filler[c_1:c_2] ... question answer.

    ``cuts`` are sorted positions in the filler budget where each needle goes (one per piece).
    """
    budget = seq_len + 1 - sum(map(len, pieces)) - len(question) - len(answer)
    if budget < 0:
        need = seq_len + 1 - budget
        raise ValueError(f"model.seq_len={seq_len} is too short for the {task!r} task (needs at least {need} "
                         f"tokens); raise model.seq_len or remove {task!r} from data.tasks")
    if len(filler) < budget:
        raise ValueError(f"filler of {len(filler)} tokens is shorter than the {budget} the {task!r} task needs")
    out: list[np.ndarray] = []
    prev = 0
    for cut, piece in zip(cuts, pieces):
        out += [filler[prev:cut], np.asarray(piece, dtype=np.int64)]
        prev = cut
    out += [filler[prev:budget], np.asarray(question + answer, dtype=np.int64)]
    window = np.concatenate(out).astype(np.int64)
    assert window.shape == (seq_len + 1,), window.shape
    answer_mask = np.zeros(seq_len, dtype=np.float32)
    answer_mask[seq_len - len(answer):] = 1.0  # labels = window[1:], so the answer is the last len(answer) labels
    return TaskSample(window, answer_mask, seq_len + 1 - budget)


def _cuts(rng: np.random.Generator, budget: int, n: int) -> list[int]:
    return sorted(int(c) for c in rng.integers(0, max(budget, 0) + 1, size=n))


def _budget(pieces: list[list[int]], question: list[int], answer: list[int], seq_len: int) -> int:
    return seq_len + 1 - sum(map(len, pieces)) - len(question) - len(answer)


def passkey(rng: np.random.Generator, filler: np.ndarray, seq_len: int, tok: Tokenizer) -> TaskSample:
    key = _digits(rng, 5)
    needle = tok.encode(f"\nThe pass key is {key}. Remember it. {key} is the pass key.\n")
    question = tok.encode("\nWhat is the pass key? The pass key is")
    answer = tok.encode(f" {key}.")
    cuts = _cuts(rng, _budget([needle], question, answer, seq_len), 1)
    return _assemble([needle], cuts, filler, question, answer, seq_len, "passkey")


def multikey(rng: np.random.Generator, filler: np.ndarray, seq_len: int, tok: Tokenizer,
             num_keys: int = 4) -> TaskSample:
    names = [_NAMES[i] for i in rng.choice(len(_NAMES), size=num_keys, replace=False)]
    keys = [_digits(rng, 5) for _ in names]
    needles = [tok.encode(f"\nThe pass key for {n} is {k}.\n") for n, k in zip(names, keys)]
    asked = int(rng.integers(num_keys))
    question = tok.encode(f"\nWhat is the pass key for {names[asked]}? It is")
    answer = tok.encode(f" {keys[asked]}.")
    order = rng.permutation(num_keys)  # needle order independent of which one is asked
    needles = [needles[i] for i in order]
    cuts = _cuts(rng, _budget(needles, question, answer, seq_len), num_keys)
    return _assemble(needles, cuts, filler, question, answer, seq_len, "multikey")


def assoc(rng: np.random.Generator, filler: np.ndarray, seq_len: int, tok: Tokenizer) -> TaskSample:
    letters = np.array(list(string.ascii_lowercase))
    question_len = len(tok.encode("\nabc:")) + len(tok.encode(" 123"))
    pairs: list[list[int]] = []
    keys: list[str] = []
    values: list[str] = []
    used = 0
    while True:  # as many unique pairs as fit; the rest of the window is filler before them
        key = "".join(rng.choice(letters, size=3))
        if key in keys:
            continue
        value = _digits(rng, 3)
        piece = tok.encode(f" {key}:{value}")
        if used + len(piece) + question_len > seq_len + 1 or len(keys) >= _MAX_PAIRS:
            break
        pairs.append(piece)
        keys.append(key)
        values.append(value)
        used += len(piece)
    if not keys:
        raise ValueError(f"model.seq_len={seq_len} is too short for the 'assoc' task; raise model.seq_len")
    asked = int(rng.integers(len(keys)))
    question = tok.encode(f"\n{keys[asked]}:")
    answer = tok.encode(f" {values[asked]}")
    block = [sum(pairs, [])]  # the pairs stay contiguous: recall, not search through prose
    budget = _budget(block, question, answer, seq_len)
    return _assemble(block, [budget], filler, question, answer, seq_len, "assoc")


_GENERATORS = {"passkey": passkey, "multikey": multikey, "assoc": assoc}


def make_task_sample(task: str, rng: np.random.Generator, filler: np.ndarray, seq_len: int,
                     tok: Tokenizer) -> TaskSample:
    """One sample of ``task`` (a name in :data:`TASKS`) over ``filler`` (>= seq_len + 1 corpus tokens)."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    return _GENERATORS[task](rng, filler, seq_len, tok)


def min_seq_len(task: str, tok: Tokenizer) -> int:
    """Smallest ``seq_len`` at which ``task`` fits, with a little slack (checked by ``check_data``).

    Measured on a few probe samples, because with a BPE tokenizer the token count of the random digits varies.
    """
    if task == "assoc":  # one pair is enough to form a question
        return len(tok.encode(" abc:123")) + len(tok.encode("\nabc:")) + len(tok.encode(" 123")) + 4
    filler = np.zeros(8192, dtype=np.int64)
    probes = [make_task_sample(task, np.random.default_rng(i), filler, 4096, tok) for i in range(8)]
    return max(p.content_len for p in probes) + 4
