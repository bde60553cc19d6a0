"""The hard toy world: task generator (6-12 chained steps, 120-250 response tokens, grading),
length-bucketed SFT batches, and the shipped trb_jax/toy/assets_hard against its build."""

import dataclasses
import json
import re

import jax
import numpy as np
import pytest

from trb_jax.models import qwen3
from trb_jax.rewards import grade
from trb_jax.toy import build, pretrain, tasks, tokenizer
from test_toy_build import check_shipped_world

HARD = tasks.HardTaskConfig()
LINE = re.compile(r"\((\d+)\) (\d+)([+-])(\d+)=(-?\d+), (\w+) has (-?\d+) (\w+)\.")


def _replay(task: tasks.Task) -> int:
    """Checks every step line of a worked solution (numbered, chained, right, fixed format)."""
    head, *lines, boxed = task.solution.split("\n")
    name, start, item = re.fullmatch(r"(\w+) has (\d+) (\w+)\.", head).groups()
    assert int(start) == task.start and task.problem.startswith(head)
    prev = task.start
    for k, (line, (sign, operand)) in enumerate(zip(lines, task.ops), start=1):
        idx, a, s, b, c, n2, c2, item2 = LINE.fullmatch(line).groups()
        assert (int(idx), int(a), s, int(b)) == (k, prev, sign, operand)
        assert int(c) == (prev + operand if sign == "+" else prev - operand) == int(c2)
        assert (n2, item2) == (name, item)
        prev = int(c)
    assert len(lines) == len(task.ops)
    assert boxed == f"\\boxed{{{prev}}}"
    return prev


def test_hard_chains_are_long_correct_and_two_digit():
    items = tasks.generate(HARD, 400, seed=0)
    assert {len(t.ops) for t in items} == set(range(6, 13))
    for t in items:
        assert _replay(t) == int(t.answer)
        # every running total (and so every step line) keeps two digits
        totals = [int(x) for x in re.findall(r"has (\d+)", t.solution)]
        assert all(10 <= v <= 99 for v in totals)
        assert all(1 <= b <= 9 for _, b in t.ops)
        assert len(tasks.solution_steps(t.solution)) == len(t.ops)
        assert t.problem.endswith("now?") and f"({len(t.ops)})" in t.problem


def test_hard_response_lengths_under_the_toy_tokenizer():
    tok = tokenizer.build_tokenizer()
    _, test = tasks.make_splits(HARD, 10, 500, seed=0)
    lengths = np.array([len(tok.encode(t.solution).ids) for t in test])
    steps = np.array([len(t.ops) for t in test])
    assert lengths.min() >= 120 and lengths.max() + 1 <= build.HARD_MAX_NEW_TOKENS <= 250
    # fixed format: the length is a function of the chain length (18 tokens per step, one
    # more for steps 10-12, plus the restated start and the box)
    np.testing.assert_array_equal(lengths, 12 + 18 * steps + np.maximum(steps - 9, 0))
    for t in test[:50]:
        assert tok.decode(tok.encode(t.solution).ids) == t.solution  # closed vocabulary


def test_hard_grading_and_noise():
    for t in tasks.generate(HARD, 20, seed=0, split="test"):
        assert grade(t.solution, t.answer) == 1.0
        assert grade(t.solution.replace(f"\\boxed{{{t.answer}}}",
                                        f"\\boxed{{{int(t.answer) + 1}}}"), t.answer) == 0.0
        assert grade(t.solution.split("\\boxed")[0], t.answer) == 0.0
    noisy = tasks.generate(dataclasses.replace(HARD, noise=0.3), 200, seed=0)
    wrong = 0
    for t in noisy:
        wrong += grade(t.solution, t.answer) == 0.0
        lines = tasks.solution_steps(t.solution)
        for prev, line in zip(lines, lines[1:]):  # an error is carried: the lines still chain
            assert line.split(" ")[1].startswith(prev.split("=")[1].split(",")[0])
    assert wrong / len(noisy) > 0.8


def test_hard_generator_is_deterministic_and_leaves_the_first_world_alone():
    a = tasks.make_splits(HARD, 100, 20, seed=3)
    assert a == tasks.make_splits(HARD, 100, 20, seed=3)
    assert not {t.problem for t in a[0]} & {t.problem for t in a[1]}
    # the first world's stream is untouched by the hard generator's existence
    first = tasks.generate(tasks.TaskConfig(), 3, seed=0)
    assert first[0].problem.count("(") == 0 and len(first[0].ops) <= 4


def test_prefix_stats_conditions_on_the_first_k_steps():
    t = tasks.generate(HARD, 1, seed=0, split="test")[0]
    lines = t.solution.split("\n")
    bad_first = "\n".join([lines[0], lines[1].replace("(1) ", "(1) 1")] + lines[2:])
    bad_third = "\n".join(lines[:3] + [lines[3] + "x"] + lines[4:])
    out = build.step_prefix_stats([t.solution, bad_first, bad_third, "no steps"],
                                  [t.solution] * 4, [t.answer] * 4)
    assert out["first_wrong_step_hist"] == {"0": 1, "1": 2, "3": 1}
    assert out["k1"]["n_prefix_right"] == 2 and out["k1"]["success_given_right"] == 1.0
    assert out["k1"]["success_given_wrong"] == pytest.approx(1 / 2)
    assert out["k3"]["n_prefix_right"] == 1 and out["k3"]["success_given_wrong"] == 2 / 3


def test_bucketed_batches_share_a_length_and_are_deterministic():
    mask = np.zeros((40, 64), np.float32)
    for i in range(40):
        mask[i, 2:10 + i] = 1.0
    assert set(pretrain.bucket_lengths(mask, 16)) == {16, 32, 48, 64}
    lengths = pretrain.bucket_lengths(mask, 32)
    assert set(lengths) == {32, 64} and lengths[0] == 32 and lengths[-1] == 64
    gen = pretrain._bucketed_batches(lengths, 4, seed=0)
    batches = [next(gen) for _ in range(20)]
    for idx, length in batches:
        assert np.all(lengths[idx] == length) and len(idx) == 4
    gen2 = pretrain._bucketed_batches(lengths, 4, seed=0)
    assert all(np.array_equal(i, j) and a == b for (i, a), (j, b) in
               zip(batches, (next(gen2) for _ in range(20))))
    cfg = build.model_config(build.ModelSpec(16, 1, 32), 111)
    tokens = np.random.default_rng(0).integers(3, 111, (40, 65), dtype=np.int32)
    spec = pretrain.TrainSpec(steps=4, batch_size=4, warmup_steps=1)
    params = qwen3.init_params(cfg, jax.random.key(0))
    p1, l1 = pretrain.train(params, cfg, tokens, mask, spec, bucket=32)
    p2, l2 = pretrain.train(params, cfg, tokens, mask, spec, bucket=32)
    np.testing.assert_array_equal(l1, l2)
    jax.tree.map(np.testing.assert_array_equal, p1, p2)


def test_world_names():
    assert build.world_config("hard") == (build.HARD_BUILD, build.HARD_ASSETS_DIR)
    assert build.world_config("default") == (build.DEFAULT_BUILD, build.ASSETS_DIR)
    assert build.max_new_tokens(build.DEFAULT_BUILD) == build.MAX_NEW_TOKENS == 48
    assert build.max_new_tokens(build.HARD_BUILD) == build.HARD_MAX_NEW_TOKENS
    assert build.HARD_BUILD != build.DEFAULT_BUILD
    with pytest.raises(ValueError):
        build.world_config("medium")


def _shipped_info() -> dict:
    assert build.is_complete(build.HARD_ASSETS_DIR)  # committed: missing is a failure
    return json.loads((build.HARD_ASSETS_DIR / "build.json").read_text())


def test_shipped_hard_world_matches_the_build():
    world = build.ensure_toy_world(world="hard")
    assert world.root == build.HARD_ASSETS_DIR
    check_shipped_world(world, build.HARD_BUILD, max_new_tokens=build.HARD_MAX_NEW_TOKENS)


def test_shipped_hard_world_meets_the_recorded_accuracy_targets():
    """Targets of the hard world, as measured by `python -m trb_jax.toy.build --world hard
    --eval-only` (500 test problems x 2 samples) and recorded in build.json: teacher pass@1 >=
    0.90, Base student pass@1 in (0, 0.15], and an early wrong step dooms the student."""
    ev = _shipped_info()["eval"]
    assert ev["n_problems"] == 500 and ev["n_samples"] >= 2
    assert ev["max_new_tokens"] == build.HARD_MAX_NEW_TOKENS
    assert ev["teacher_pass@1"] >= 0.90, ev
    assert 0.0 < ev["student_pass@1"] <= 0.15, ev
    for k in ("k1", "k2", "k3"):
        s = ev["student_prefix"][k]
        assert s["n_prefix_right"] + s["n_prefix_wrong"] == 500 * ev["n_samples"]
        assert s["success_given_wrong"] < s["success_given_right"]
