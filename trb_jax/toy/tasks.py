"""Synthetic multi-step arithmetic word problems with worked, verifiable solutions.

    config = TaskConfig(min_steps=2, max_steps=4)
    train, test = make_splits(config, n_train=20_000, n_test=500, seed=0)
    train[0].problem   # "Ann has 7 pens. She buys 5. She loses 3. How many pens now?"
    train[0].solution  # "7+5=12\n12-3=9\n\\boxed{9}"
    train[0].answer    # "9"
    write_jsonl(test, "test.jsonl")    # {"problem", "answer", "solution"} per line

Every number a model has to produce is the result of one small addition or subtraction written
as its own step, so a model that knows the ~500 facts `a +- b` (a <= max_total,
b <= max_operand) and copies the right operands solves every problem. The final answer is the
last step's result in `\\boxed{}`, which `trb_jax.rewards.grade` (math-verify) checks.

Difficulty: `min_steps` / `max_steps` (operations per problem), `max_start`, `max_operand`,
`max_total` (every running total stays in [0, max_total]). `noise` > 0 writes *wrong* worked
solutions: each step's result is off by +-1 or +-2 with that probability (later steps continue
from the wrong value, so the solution reads consistently but its answer is wrong while the
record's `answer` stays the true one); the weak Base student is pretrained on such data.

Splits are fixed by the seed: the test problems are drawn first from their own stream and the
train stream skips any problem text that is in the test split, so the two are disjoint.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "NAMES",
    "ITEMS",
    "ADD_VERBS",
    "SUB_VERBS",
    "TaskConfig",
    "HardTaskConfig",
    "Task",
    "render_solution",
    "render_hard_solution",
    "solution_steps",
    "sample_task",
    "generate",
    "make_splits",
    "write_jsonl",
    "read_jsonl",
]

# (name, pronoun): the closed vocabulary of the toy world (trb_jax.toy.tokenizer covers it).
NAMES: tuple[tuple[str, str], ...] = (
    ("Ann", "She"), ("Bob", "He"), ("Cat", "She"), ("Dan", "He"),
    ("Eve", "She"), ("Gus", "He"), ("Ivy", "She"), ("Max", "He"),
)  # fmt: skip
ITEMS: tuple[str, ...] = ("apples", "pens", "cards", "coins", "shells", "books", "eggs", "stamps")
ADD_VERBS: tuple[str, ...] = ("buys", "finds", "gets", "wins")
SUB_VERBS: tuple[str, ...] = ("loses", "sells", "gives away", "uses")

# Independent numpy streams per split: Generator(PCG64([seed, _STREAM[split]])).
_STREAM = {"train": 1, "test": 2}


def _check_steps_and_noise(config) -> None:
    """Raises ValueError unless 1 <= min_steps <= max_steps and noise is in [0, 1]."""
    if not 1 <= config.min_steps <= config.max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {config.min_steps}, "
                         f"{config.max_steps}")
    if not 0.0 <= config.noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {config.noise}")


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Difficulty of the generated problems (see the module docstring)."""

    min_steps: int = 2
    max_steps: int = 4
    max_start: int = 15
    max_operand: int = 9
    max_total: int = 30
    noise: float = 0.0

    def __post_init__(self):
        _check_steps_and_noise(self)
        if not 1 <= self.max_start <= self.max_total or self.max_operand < 1:
            raise ValueError("need 1 <= max_start <= max_total and max_operand >= 1")


@dataclasses.dataclass(frozen=True)
class HardTaskConfig:
    """The hard world's problems: long chains of dependent steps over a two-digit running total.

    `min_steps`..`max_steps` operations; the start and every running total stay in
    [min_total, max_total] (two digits by default, so every step line has a fixed token
    length); operands 1..max_operand. `noise` as in `TaskConfig` (a wrong step's error is
    carried by every later step)."""

    min_steps: int = 6
    max_steps: int = 12
    min_total: int = 10
    max_total: int = 99
    max_operand: int = 9
    noise: float = 0.0

    def __post_init__(self):
        _check_steps_and_noise(self)
        if not 0 <= self.min_total < self.max_total or self.max_operand < 1:
            raise ValueError("need 0 <= min_total < max_total and max_operand >= 1")


@dataclasses.dataclass(frozen=True)
class Task:
    """One problem. `ops` are (sign, operand) pairs; `solution` is the worked solution the
    model is trained on (wrong when the task was drawn with noise); `answer` is always true."""

    problem: str
    answer: str
    solution: str
    start: int
    ops: tuple[tuple[str, int], ...]

    def to_record(self) -> dict:
        return {"problem": self.problem, "answer": self.answer, "solution": self.solution}


def render_solution(start: int, ops: Sequence[tuple[str, int]],
                    errors: Sequence[int] | None = None) -> str:
    """"a+b=c" lines, one per op, then "\\boxed{final}"; errors[i] is added to step i's result
    (and carried into the following steps)."""
    lines, total = [], start
    for i, (sign, operand) in enumerate(ops):
        result = total + operand if sign == "+" else total - operand
        result += 0 if errors is None else int(errors[i])
        lines.append(f"{total}{sign}{operand}={result}")
        total = result
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def _sample_steps(rng: np.random.Generator, pronoun: str, start: int, n_steps: int, lo: int,
                  hi: int, max_operand: int, numbered: bool):
    """(final total, ops, problem sentences) of n_steps random operations that keep the running
    total in [lo, hi]; `numbered` prefixes each sentence with "(k) " (the hard world)."""
    total, ops, sentences = start, [], []
    for k in range(n_steps):
        # Only moves that keep the running total in [lo, hi] are allowed.
        can_add = total + 1 <= hi
        can_sub = total - 1 >= lo
        sign = "+" if (can_add and (not can_sub or rng.random() < 0.5)) else "-"
        room = hi - total if sign == "+" else total - lo
        operand = int(rng.integers(1, min(max_operand, room) + 1))
        verbs = ADD_VERBS if sign == "+" else SUB_VERBS
        number = f"({k + 1}) " if numbered else ""
        sentences.append(f"{number}{pronoun} {verbs[rng.integers(len(verbs))]} {operand}.")
        total = total + operand if sign == "+" else total - operand
        ops.append((sign, operand))
    return total, ops, sentences


def _draw_errors(rng: np.random.Generator, n_steps: int, noise: float) -> np.ndarray | None:
    """Per-step result offsets (0, or +-1 / +-2 with probability `noise`); None without noise."""
    if noise <= 0:
        return None
    wrong = rng.random(n_steps) < noise
    offsets = rng.choice(np.array([-2, -1, 1, 2]), size=n_steps)
    return np.where(wrong, offsets, 0)


def sample_task(rng: np.random.Generator, config: TaskConfig | HardTaskConfig) -> Task:
    """One random task (numbers, wording and noise drawn from `rng`)."""
    hard = isinstance(config, HardTaskConfig)
    name, pronoun = NAMES[rng.integers(len(NAMES))]
    item = ITEMS[rng.integers(len(ITEMS))]
    n_steps = int(rng.integers(config.min_steps, config.max_steps + 1))
    if hard:
        start, lo = int(rng.integers(config.min_total, config.max_total + 1)), config.min_total
    else:
        start, lo = int(rng.integers(1, config.max_start + 1)), 0
    total, ops, sentences = _sample_steps(rng, pronoun, start, n_steps, lo, config.max_total,
                                          config.max_operand, numbered=hard)
    problem = f"{name} has {start} {item}. " + " ".join(sentences) + f" How many {item} now?"
    errors = _draw_errors(rng, n_steps, config.noise)
    solution = (render_hard_solution(name, item, start, ops, errors) if hard
                else render_solution(start, ops, errors))
    return Task(problem=problem, answer=str(total), solution=solution, start=start,
                ops=tuple(ops))


def render_hard_solution(name: str, item: str, start: int, ops: Sequence[tuple[str, int]],
                         errors: Sequence[int] | None = None) -> str:
    """The hard world's worked solution: the start restated, then one line per operation
    "(k) a+b=c, Name has c items." carrying the running total, then "\\boxed{final}";
    errors[i] is added to step i's result and carried into the following steps."""
    lines, total = [f"{name} has {start} {item}."], start
    for i, (sign, operand) in enumerate(ops):
        result = total + operand if sign == "+" else total - operand
        result += 0 if errors is None else int(errors[i])
        lines.append(f"({i + 1}) {total}{sign}{operand}={result}, {name} has {result} {item}.")
        total = result
    lines.append(f"\\boxed{{{total}}}")
    return "\n".join(lines)


def solution_steps(text: str) -> list[str]:
    """The step lines "(k) ..." of a hard-world response, in order (prefix checks: the first k
    steps of a response are right when they equal the first k of the true solution)."""
    return [line for line in text.split("\n") if line.startswith("(")]


def generate(config: TaskConfig | HardTaskConfig, n: int, seed: int, split: str = "train",
             exclude: Iterable[str] = ()) -> list[Task]:
    """`n` distinct tasks of `split`'s stream for `seed`, skipping problem texts in `exclude`."""
    rng = np.random.Generator(np.random.PCG64([seed, _STREAM[split]]))
    seen = set(exclude)
    out: list[Task] = []
    misses = 0
    while len(out) < n:
        task = sample_task(rng, config)
        if task.problem in seen:
            misses += 1
            if misses > 100 * n + 1000:
                raise ValueError(f"cannot draw {n} distinct problems with {config}")
            continue
        seen.add(task.problem)
        out.append(task)
    return out


def make_splits(config: TaskConfig | HardTaskConfig, n_train: int, n_test: int, seed: int = 0,
                test_config: TaskConfig | HardTaskConfig | None = None) -> tuple[list[Task], list[Task]]:
    """(train, test) for `seed`: disjoint problem texts; test drawn with `test_config`
    (default: `config` without noise)."""
    test_config = test_config or dataclasses.replace(config, noise=0.0)
    test = generate(test_config, n_test, seed, "test")
    train = generate(config, n_train, seed, "train", exclude=(t.problem for t in test))
    return train, test


def write_jsonl(tasks: Iterable[Task], path: str | os.PathLike) -> None:
    """One JSON object {"problem", "answer", "solution"} per line (trb_jax.data reads it)."""
    with open(path, "w", encoding="utf-8") as f:
        for task in tasks:
            f.write(json.dumps(task.to_record()) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
