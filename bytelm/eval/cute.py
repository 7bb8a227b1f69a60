"""Character-level tasks in the style of CUTE ("CUTE: Measuring LLMs' Understanding of Their Tokens"),
generated from the corpus vocabulary by a seeded generator and scored by log-likelihood ranking.

Tasks (each item asks about one word of the vocabulary; ``c`` is a letter not in the word, ``d`` one in it):

- ``spell``    ``Spell "hello":`` -> ``h e l l o``
- ``reverse``  ``Reverse "hello":`` -> ``olleh``
- ``count``    ``Count "l" in "hello":`` -> ``2``
- ``insert``   ``Insert "x" after every "l" in "hello":`` -> ``helxlxo``
- ``replace``  ``Replace every "l" with "x" in "hello":`` -> ``hexxo``

Every item has ``shots`` solved examples of the same task (other words) before the query, and
``n_candidates`` answers: the right one and near misses of the same kind (the answer for a corrupted word,
the operation applied at the wrong place or to the wrong letter, other counts). The unchanged word is never a
candidate: a language model prefers a real word to any edit of it, which would measure that preference rather
than character skill. A model *solves* an item when the right answer
has the highest log-likelihood (``acc``), or the highest log-likelihood per byte (``acc_norm``, which does
not favour short answers). Chance is ``1 / n_candidates``. Continuations are `` answer\\n`` (leading space,
as lm-evaluation-harness does for subword models; the newline scores the end of the answer).

The vocabulary is the lowercase words of 4-9 letters seen at least ``min_count`` times in the Shakespeare
*training* split. The generator is a pure function of ``(task, n, seed, vocabulary, shots, n_candidates)``.
"""

from __future__ import annotations

import functools
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

TASKS = ("spell", "reverse", "count", "insert", "replace")
LETTERS = "abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Item:
    task: str
    context: str  # solved examples + the query (no trailing space)
    candidates: tuple[str, ...]  # continuations: " " + answer + "\n"
    answer: int  # index of the right candidate
    word: str


@functools.lru_cache(maxsize=4)
def corpus_vocabulary(min_len: int = 4, max_len: int = 9, min_count: int = 5) -> tuple[str, ...]:
    """Sorted lowercase words of the Shakespeare training split (``min_len``-``max_len`` letters)."""
    from bytelm.data.shakespeare import shakespeare_documents

    pat = re.compile(rb"(?<![A-Za-z'])[a-z]{%d,%d}(?![A-Za-z'])" % (min_len, max_len))
    counts: Counter[bytes] = Counter()
    for d in shakespeare_documents("train"):
        counts.update(pat.findall(d.data))
    return tuple(sorted(w.decode() for w, c in counts.items() if c >= min_count))


# ------------------------------------------------------------------------------------------------ tasks
# Each task: (word, rng) -> (query, answer, near misses). Near misses may repeat or equal the answer: the
# caller dedups and tops up with corruptions of the answer.


def _corrupt(s: str, rng: random.Random) -> str:
    """One random edit of ``s``: swap two neighbours, drop, substitute or double a character."""
    if len(s) < 2:
        return s + rng.choice(LETTERS)
    i = rng.randrange(len(s) - 1)
    op = rng.randrange(4)
    if op == 0:
        return s[:i] + s[i + 1] + s[i] + s[i + 2 :]
    if op == 1:
        return s[:i] + s[i + 1 :]
    if op == 2:
        return s[:i] + rng.choice([c for c in LETTERS if c != s[i]]) + s[i + 1 :]
    return s[: i + 1] + s[i] + s[i + 1 :]


def _spell(w: str, rng: random.Random) -> tuple[str, str, list[str]]:
    return f'Spell "{w}":', " ".join(w), [" ".join(_corrupt(w, rng)) for _ in range(4)]


def _reverse(w: str, rng: random.Random) -> tuple[str, str, list[str]]:
    r = w[::-1]
    return f'Reverse "{w}":', r, [w[0] + w[:0:-1], *[_corrupt(r, rng) for _ in range(3)]]


def _count(w: str, rng: random.Random) -> tuple[str, str, list[str]]:
    absent = [c for c in LETTERS if c not in w]
    c = rng.choice(absent) if rng.random() < 0.25 and absent else rng.choice(sorted(set(w)))
    n = w.count(c)
    others = [str(k) for k in range(max(5, n + 3)) if k != n]
    rng.shuffle(others)
    return f'Count "{c}" in "{w}":', str(n), others


def _letters(w: str, rng: random.Random) -> tuple[str, str]:
    """``d`` a letter of ``w``, ``c`` a letter not in ``w``."""
    d = rng.choice(sorted(set(w)))
    c = rng.choice([x for x in LETTERS if x not in w])
    return d, c


def _insert(w: str, rng: random.Random) -> tuple[str, str, list[str]]:
    d, c = _letters(w, rng)
    other = rng.choice([x for x in sorted(set(w)) if x != d] or [d])
    i = w.index(d) + 1
    misses = [w.replace(d, c + d), w[:i] + c + w[i:], w.replace(other, other + c)]
    return f'Insert "{c}" after every "{d}" in "{w}":', w.replace(d, d + c), misses


def _replace(w: str, rng: random.Random) -> tuple[str, str, list[str]]:
    d, c = _letters(w, rng)
    other = rng.choice([x for x in sorted(set(w)) if x != d] or [d])
    c2 = rng.choice([x for x in LETTERS if x not in w and x != c])
    misses = [w.replace(d, c, 1), w.replace(other, c), w.replace(d, c2)]
    return f'Replace every "{d}" with "{c}" in "{w}":', w.replace(d, c), misses


_TASKS: dict[str, Callable[[str, random.Random], tuple[str, str, list[str]]]] = {
    "spell": _spell,
    "reverse": _reverse,
    "count": _count,
    "insert": _insert,
    "replace": _replace,
}


def generate_items(
    task: str,
    n: int,
    seed: int = 0,
    vocab: Sequence[str] | None = None,
    shots: int = 3,
    n_candidates: int = 4,
) -> list[Item]:
    """``n`` items of ``task``; the same arguments always give the same items."""
    if task not in _TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    words = sorted(set(vocab if vocab is not None else corpus_vocabulary()))
    words = [w for w in words if len(w) >= 2 and set(w) <= set(LETTERS) and len(set(w)) < len(LETTERS)]
    if len(words) < shots + 1:
        raise ValueError(f"vocabulary of {len(words)} usable words is too small for {shots} shots")
    rng = random.Random(f"bytelm-cute:{task}:{seed}")
    fn = _TASKS[task]
    items = []
    for _ in range(n):
        picked = rng.sample(words, shots + 1)
        demos = []
        for w in picked[:shots]:
            q, a, _m = fn(w, rng)
            demos.append(f"{q} {a}\n")
        w = picked[-1]
        query, answer, misses = fn(w, rng)
        cands = [answer]
        pool = list(misses)
        tries = 0
        while len(cands) < n_candidates and tries < 200:
            cand = pool.pop(0) if pool else _corrupt(answer, rng)
            tries += 1
            if cand and cand not in cands and cand != w:  # never the unchanged word (see the module doc)
                cands.append(cand)
        order = list(range(len(cands)))
        rng.shuffle(order)
        items.append(
            Item(
                task=task,
                context="".join(demos) + query,
                candidates=tuple(f" {cands[i]}\n" for i in order),
                answer=order.index(0),
                word=w,
            )
        )
    return items


def generate_suite(
    tasks: Sequence[str] = TASKS,
    n_per_task: int = 50,
    seed: int = 0,
    vocab: Sequence[str] | None = None,
    shots: int = 3,
    n_candidates: int = 4,
) -> list[Item]:
    return [it for t in tasks for it in generate_items(t, n_per_task, seed, vocab, shots, n_candidates)]


def majority_baseline(items: Sequence[Item]) -> dict[str, float]:
    """Per task, the accuracy of always answering the task's most common right answer (the text of the right
    candidate). A model that only learned the answer prior scores this: for ``count`` most letters occur once,
    so " 1" is right far more often than chance (0.25)."""
    by_task: dict[str, list[str]] = {}
    for it in items:
        by_task.setdefault(it.task, []).append(it.candidates[it.answer])
    out = {}
    for task, answers in by_task.items():
        top = max(set(answers), key=lambda a: (answers.count(a), a))
        # the baseline picks `top` whenever it is among the candidates; it is right when it is the answer
        out[task] = answers.count(top) / len(answers)
    return out


def score_items(scorer: Any, items: Sequence[Item]) -> dict[str, Any]:
    """Accuracy of log-likelihood ranking per task: ``{"tasks": {task: {acc, acc_norm, n, chance}}, "acc",
    "acc_norm"}`` (the last two: means over tasks)."""
    per: dict[str, dict[str, float]] = {}
    for it in items:
        conts = [c.encode("utf-8") for c in it.candidates]
        lps = scorer.continuation_logprobs(it.context.encode("utf-8"), conts)
        best = max(range(len(lps)), key=lambda i: lps[i])
        best_norm = max(range(len(lps)), key=lambda i: lps[i] / max(len(conts[i]), 1))
        r = per.setdefault(it.task, {"acc": 0.0, "acc_norm": 0.0, "n": 0, "chance": 0.0})
        r["acc"] += best == it.answer
        r["acc_norm"] += best_norm == it.answer
        r["chance"] += 1.0 / len(conts)
        r["n"] += 1
    for r in per.values():
        for k in ("acc", "acc_norm", "chance"):
            r[k] /= r["n"]
    mean = {k: sum(r[k] for r in per.values()) / max(len(per), 1) for k in ("acc", "acc_norm", "chance")}
    return {"tasks": per, **mean}
