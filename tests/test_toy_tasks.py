"""trb_jax.toy.tasks: determinism, disjoint splits, consistent worked solutions, grading."""

import dataclasses
import json
import re

import pytest

from trb_jax.data import DataConfig, load_problems
from trb_jax.rewards import grade
from trb_jax.toy import tasks

CFG = tasks.TaskConfig()


def _evaluate(solution: str) -> int:
    """Replays the worked solution: every line a+b=c must be right and chained; returns the box."""
    *lines, boxed = solution.split("\n")
    prev = None
    for line in lines:
        a, sign, b, c = re.fullmatch(r"(-?\d+)([+-])(\d+)=(-?\d+)", line).groups()
        assert prev is None or int(a) == prev
        assert int(c) == (int(a) + int(b) if sign == "+" else int(a) - int(b))
        prev = int(c)
    assert boxed == f"\\boxed{{{prev}}}"
    return prev


def test_deterministic_by_seed():
    a = tasks.make_splits(CFG, 200, 50, seed=3)
    b = tasks.make_splits(CFG, 200, 50, seed=3)
    c = tasks.make_splits(CFG, 200, 50, seed=4)
    assert a == b
    assert [t.problem for t in a[0]] != [t.problem for t in c[0]]


def test_splits_are_disjoint_and_distinct():
    train, test = tasks.make_splits(CFG, 3000, 300, seed=0)
    train_p, test_p = [t.problem for t in train], [t.problem for t in test]
    assert len(set(train_p)) == 3000 and len(set(test_p)) == 300
    assert not set(train_p) & set(test_p)
    # The test split does not depend on the train size (it is drawn first, from its own stream).
    assert tasks.make_splits(CFG, 10, 300, seed=0)[1] == test


def test_solutions_are_correct_and_within_difficulty():
    cfg = tasks.TaskConfig(min_steps=1, max_steps=5, max_start=30, max_operand=7, max_total=50)
    for t in tasks.generate(cfg, 500, seed=1):
        assert _evaluate(t.solution) == int(t.answer)
        assert 1 <= len(t.ops) <= 5 and 1 <= t.start <= 30
        assert all(1 <= b <= 7 for _, b in t.ops)
        assert all(0 <= int(line.split("=")[1]) <= 50 for line in t.solution.split("\n")[:-1])
        assert t.problem.count(".") == len(t.ops) + 1 and t.problem.endswith("now?")


def test_noise_writes_wrong_but_consistent_solutions():
    noisy = dataclasses.replace(CFG, noise=0.5)
    items = tasks.generate(noisy, 400, seed=0)
    wrong = 0
    for t in items:
        boxed = int(re.search(r"\\boxed\{(-?\d+)\}", t.solution).group(1))
        wrong += boxed != int(t.answer)
        # A noisy step is off by 1 or 2; the lines still chain (each starts from the last result).
        lines = t.solution.split("\n")[:-1]
        for prev, line in zip(lines, lines[1:]):
            assert line.startswith(prev.split("=")[1])
    assert 0.5 < wrong / len(items) < 0.95


def test_grading_correct_and_wrong():
    for t in tasks.generate(CFG, 20, seed=0, split="test"):
        assert grade(t.solution, t.answer) == 1.0
        wrong = t.solution.replace(f"\\boxed{{{t.answer}}}", f"\\boxed{{{int(t.answer) + 1}}}")
        assert grade(wrong, t.answer) == 0.0
        assert grade(t.solution.split("\\boxed")[0], t.answer) == 0.0  # no box, no credit


def test_jsonl_is_what_the_data_module_reads(tmp_path):
    train, _ = tasks.make_splits(CFG, 30, 5, seed=0)
    path = tmp_path / "train.jsonl"
    tasks.write_jsonl(train, path)
    assert json.loads(path.read_text().splitlines()[0]).keys() == {"problem", "answer",
                                                                   "solution"}
    problems, answers = load_problems(DataConfig(source=str(path)))
    assert problems == [t.problem for t in train] and answers == [t.answer for t in train]


def test_bad_config():
    with pytest.raises(ValueError):
        tasks.TaskConfig(min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        tasks.TaskConfig(noise=1.5)
