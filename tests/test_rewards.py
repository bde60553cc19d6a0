"""Tests for trb_jax/rewards.py: math-verify grading, the timeout-bounded pool, pass@k, AUROC.

References are independent: pass@k against enumeration of every k-subset (exact fractions),
AUROC against the O(N^2) pair count.
"""

import itertools
import os
import math
import threading
import time
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from trb_jax import rewards

# (reference answer, response, expected reward)
GRADING_CASES = [
    ("42", "2 * 21 = 42, so the answer is \\boxed{42}.", 1.0),
    ("42", "I get \\boxed{41}.", 0.0),
    ("\\frac{1}{2}", "The probability is \\boxed{0.5}.", 1.0),
    ("0.5", "Hence \\boxed{\\frac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "Hence \\boxed{\\dfrac{1}{2}}", 1.0),
    ("\\frac{1}{2}", "Hence \\boxed{\\frac{1}{3}}", 0.0),
    ("$\\boxed{3\\sqrt{2}}$", "The side is \\boxed{\\sqrt{18}}.", 1.0),
    ("x^2+2x+1", "Expanding, \\boxed{(x+1)^2}", 1.0),
    ("x^2+2x+1", "Expanding, \\boxed{(x-1)^2}", 0.0),
    ("\\frac{\\pi}{4}", "The angle is $\\boxed{\\pi/4}$.", 1.0),
    ("[1, 3)", "The solution set is \\boxed{[1,3)}", 1.0),
    ("[1, 3)", "The solution set is \\boxed{(1,3)}", 0.0),
    ("\\{1,2,3\\}", "The roots are \\boxed{\\{3, 2, 1\\}}", 1.0),
    ("10\\%", "The rate is \\boxed{10\\%}", 1.0),
    ("42", "The answer is 42.", 0.0),  # right number, no \boxed: the format is required
    ("42", "\\boxed{{{}}\\frac}}{", 0.0),  # garbage
    ("42", "", 0.0),
    ("", "\\boxed{42}", 0.0),
]


@pytest.fixture(scope="module")
def grader():
    # One pool for the module; _faulty_grade_for_tests is `grade` plus "__hang__"/"__crash__".
    with rewards.Grader(max_workers=2, _grade_fn=rewards._faulty_grade_for_tests) as g:
        yield g


# ---- grading -------------------------------------------------------------------------------


@pytest.mark.parametrize("answer,response,expected", GRADING_CASES)
def test_grade_in_process(answer, response, expected):
    assert rewards.grade(response, answer) == expected


def test_grade_batch_matches_grade(grader):
    answers = [a for a, _, _ in GRADING_CASES]
    responses = [r for _, r, _ in GRADING_CASES]
    out = grader.grade_batch(responses, answers, timeout_s=10.0)
    assert out.dtype == np.float32 and out.shape == (len(GRADING_CASES),)
    np.testing.assert_array_equal(out, [e for _, _, e in GRADING_CASES])


def test_grade_off_main_thread():
    # math-verify's signal timeout would raise off the main thread; grade disables it there.
    result = []
    t = threading.Thread(target=lambda: result.append(rewards.grade("\\boxed{\\frac12}", "0.5")))
    t.start()
    t.join()
    assert result == [1.0]


def test_grade_non_string_is_zero():
    assert rewards.grade(None, "1") == 0.0
    assert rewards.grade("\\boxed{1}", 1) == 0.0


def test_hanging_item_times_out_and_grader_recovers(grader):
    restarts = grader.num_restarts
    timeout_s = 1.0
    start = time.monotonic()
    out = grader.grade_batch(["__hang__"], ["1"], timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    np.testing.assert_array_equal(out, [0.0])
    assert elapsed < timeout_s + 1.5, elapsed
    assert grader.num_restarts == restarts + 1
    # Mixed batch: the hung item scores 0.0, the items in flight beside it are regraded.
    responses = ["\\boxed{1}", "__hang__", "\\boxed{3}", "\\boxed{5}", "\\boxed{4}"]
    out = grader.grade_batch(responses, ["1", "2", "3", "4", "4"], timeout_s=timeout_s)
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0, 0.0, 1.0])
    out = grader.grade_batch(["\\boxed{7}"] * 4, ["7"] * 4)
    np.testing.assert_array_equal(out, [1.0] * 4)


def test_crashing_worker_scores_zero_and_others_survive(grader):
    responses = ["\\boxed{1}", "__crash__", "\\boxed{3}", "\\boxed{4}"]
    out = grader.grade_batch(responses, ["1", "2", "3", "4"], timeout_s=5.0)
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0, 1.0])


def test_grade_batch_empty(grader):
    out = grader.grade_batch([], [])
    assert out.shape == (0,) and out.dtype == np.float32


def test_module_grade_batch():
    out = rewards.grade_batch(["\\boxed{2}", "\\boxed{3}"], ["2", "2"], max_workers=1)
    np.testing.assert_array_equal(out, [1.0, 0.0])


def test_grader_argument_errors(grader):
    with pytest.raises(ValueError, match="same length, got 2 and 1"):
        grader.grade_batch(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="timeout_s must be a finite number > 0, got 0"):
        grader.grade_batch(["a"], ["a"], timeout_s=0)
    with pytest.raises(ValueError, match="timeout_s must be a finite number > 0, got inf"):
        grader.grade_batch(["a"], ["a"], timeout_s=math.inf)
    with pytest.raises(ValueError, match="max_workers must be a positive integer, got 0"):
        rewards.Grader(max_workers=0)
    with pytest.raises(ValueError, match="must be 'spawn' or 'forkserver', got 'fork'"):
        rewards.Grader(max_workers=1, start_method="fork")
    with pytest.raises(ValueError, match="startup_timeout_s must be > 0, got -1"):
        rewards.Grader(max_workers=1, startup_timeout_s=-1)


def test_closed_grader_raises():
    g = rewards.Grader(max_workers=1)
    g.close()
    with pytest.raises(RuntimeError, match="Grader is closed"):
        g.grade_batch(["\\boxed{1}"], ["1"])


# ---- pass@k --------------------------------------------------------------------------------


def brute_pass_at_k(n, c, k) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) with a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


@pytest.mark.parametrize("n", range(1, 9))
def test_pass_at_k_matches_subset_enumeration(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert rewards.pass_at_k(n, c, k) == pytest.approx(
                float(brute_pass_at_k(n, c, k)), abs=1e-12
            )


@st.composite
def n_c_k(draw, max_n=600):
    n = draw(st.integers(1, max_n))
    return n, draw(st.integers(0, n)), draw(st.integers(1, n))


@given(n_c_k())
def test_pass_at_k_properties(nck):
    n, c, k = nck
    p = rewards.pass_at_k(n, c, k)
    assert 0.0 <= p <= 1.0
    assert rewards.pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
    if c < n:
        assert rewards.pass_at_k(n, c + 1, k) >= p
    if k < n:
        assert rewards.pass_at_k(n, c, k + 1) >= p
    if c == 0:
        assert p == 0.0
    # Exact binomial ratio as the reference (Python ints do not overflow).
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert p == pytest.approx(float(exact), abs=1e-12)


def test_pass_at_k_errors():
    with pytest.raises(ValueError, match=r"k must be <= n \(number of samples\), got k=5 > n=4"):
        rewards.pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match=r"c \(number correct\) must be <= n, got c=5 > n=4"):
        rewards.pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="n must be >= 0, got -1"):
        rewards.pass_at_k(-1, 0, 1)
    with pytest.raises(ValueError, match="c must be >= 0, got -2"):
        rewards.pass_at_k(4, -2, 1)
    with pytest.raises(ValueError, match="k must be >= 0, got -3"):
        rewards.pass_at_k(4, 1, -3)
    with pytest.raises(ValueError, match="k must be >= 1, got 0"):
        rewards.pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="n must be an integer, got 4.5"):
        rewards.pass_at_k(4.5, 1, 1)


def test_pass_at_k_accepts_numpy_ints():
    assert rewards.pass_at_k(np.int64(4), np.int32(2), np.int64(2)) == pytest.approx(5 / 6)


@given(
    st.integers(1, 6).flatmap(
        lambda p: st.integers(1, 8).flatmap(
            lambda n: st.lists(
                st.lists(st.booleans(), min_size=n, max_size=n), min_size=p, max_size=p
            )
        )
    ),
    st.integers(1, 8),
)
def test_pass_at_k_mean(rows, k):
    correct_pn = np.array(rows)
    n = correct_pn.shape[1]
    assert rewards.pass_at_1_mean(correct_pn) == pytest.approx(
        np.mean([sum(r) / n for r in rows]), abs=1e-12
    )
    assert rewards.pass_at_k_mean(correct_pn, 1) == pytest.approx(
        rewards.pass_at_1_mean(correct_pn), abs=1e-12
    )
    if k <= n:
        expected = np.mean([float(brute_pass_at_k(n, sum(r), k)) for r in rows])
        assert rewards.pass_at_k_mean(correct_pn, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_mean_errors():
    with pytest.raises(ValueError, match=r"\[problems, samples\] array, got shape \(3,\)"):
        rewards.pass_at_1_mean(np.ones(3))
    with pytest.raises(ValueError, match=r"got shape \(0, 4\)"):
        rewards.pass_at_k_mean(np.ones((0, 4)), 1)
    with pytest.raises(ValueError, match="correct_pn must hold only 0/1"):
        rewards.pass_at_1_mean(np.full((2, 2), 0.5))
    with pytest.raises(ValueError, match="k must be <= n"):
        rewards.pass_at_k_mean(np.ones((2, 2)), 3)


# ---- AUROC ---------------------------------------------------------------------------------


def brute_auroc(scores, labels) -> float:
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (len(pos) * len(neg))


# Few distinct values (ties across classes are common), plus infinities.
score = st.one_of(
    st.integers(-3, 3).map(float),
    st.floats(-1e6, 1e6, allow_nan=False),
    st.sampled_from([-math.inf, math.inf]),
)


@given(st.lists(st.tuples(score, st.integers(0, 1)), min_size=2, max_size=40))
def test_auroc_matches_pair_count(pairs):
    scores, labels = zip(*pairs)
    got = rewards.auroc(np.array(scores), np.array(labels))
    if len(set(labels)) == 1:
        assert math.isnan(got)
    else:
        assert got == pytest.approx(brute_auroc(scores, labels), abs=1e-12)
        flipped = rewards.auroc(-np.array(scores), np.array(labels))
        assert got + flipped == pytest.approx(1.0, abs=1e-12)


def test_auroc_known_cases():
    assert rewards.auroc([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1]) == 1.0
    assert rewards.auroc([0.9, 0.8, 0.1, 0.2], [0, 0, 1, 1]) == 0.0
    assert rewards.auroc([0.5, 0.5, 0.5], [0, 1, 1]) == 0.5
    assert rewards.auroc(np.array([1.0, 2.0]), np.array([True, False])) == 0.0


def test_auroc_single_class_is_nan():
    assert math.isnan(rewards.auroc([0.1, 0.2, 0.3], [1, 1, 1]))
    assert math.isnan(rewards.auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(rewards.auroc([], []))


def test_auroc_errors():
    with pytest.raises(ValueError, match=r"1-D of the same length, got shapes \(3,\) and \(2,\)"):
        rewards.auroc([1.0, 2.0, 3.0], [0, 1])
    with pytest.raises(ValueError, match="scores must not contain NaN"):
        rewards.auroc([1.0, math.nan], [0, 1])
    with pytest.raises(ValueError, match="labels must hold only 0/1"):
        rewards.auroc([1.0, 2.0], [0, 2])


_ORPHAN_SCRIPT = """
import os, signal, sys
from trb_jax.rewards import Grader
if __name__ == "__main__":
    g = Grader(2)
    print(" ".join(str(p) for p in g.worker_pids), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_workers_exit_when_the_parent_is_killed(tmp_path):
    """kill -9 of the trainer cannot close the pool; the workers must notice and exit."""
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "orphan.py"
    script.write_text(_ORPHAN_SCRIPT)
    with open(tmp_path / "out.txt", "w") as out:
        proc = subprocess.run([sys.executable, str(script)], stdout=out, timeout=120)
    assert proc.returncode == -signal.SIGKILL
    pids = [int(p) for p in (tmp_path / "out.txt").read_text().split()]
    assert len(pids) == 2

    def alive(pid):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return not open(f"/proc/{pid}/stat").read().split()[2] == "Z" if os.path.exists(
            f"/proc/{pid}/stat") else False

    deadline = time.time() + 20
    while time.time() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)
