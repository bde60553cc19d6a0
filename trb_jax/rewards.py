"""Verifier rewards (math-verify, 1.0 correct / 0.0 otherwise) and evaluation metrics.

`grade` scores one response against one reference answer. `Grader` scores batches in a pool
of spawned worker processes (pebble's ProcessPool) with a per-item wall-clock deadline, so a
pathological expression can cost at most `timeout_s` seconds and a 0.0, never a hung trainer:
math-verify's own timeouts use `signal.alarm`, which only works in the main thread of a
process (and not at all inside a JAX host callback or a data-loader thread). See docs/rewards.md.

Metrics: `pass_at_k` (the unbiased estimator of Chen et al. 2021), `pass_at_1_mean`,
`pass_at_k_mean` over a `[problems, samples]` correctness matrix, and `auroc` for the
teacher-support-score diagnostic (docs/method.md, section 6).
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import operator
import os
import threading
import time
from concurrent import futures
from typing import Callable, Sequence

import numpy as np
import pebble

__all__ = [
    "grade",
    "Grader",
    "grade_batch",
    "pass_at_k",
    "pass_at_1_mean",
    "pass_at_k_mean",
    "auroc",
]

GradeFn = Callable[[str, str], float]

# math-verify's signal-based timeout per parse/verify call (whole seconds: signal.alarm). It is
# the inner guard; the parent's per-item deadline in Grader is the one that always holds.
_MATH_VERIFY_TIMEOUT_S = 5
_BOXED_MARKERS = ("\\boxed", "\\fbox")


def _math_verify_timeout() -> int | None:
    # signal.alarm raises ValueError outside the main thread, which math-verify would turn into
    # a silent 0.0; off the main thread we disable it and rely on the caller's deadline.
    if threading.current_thread() is threading.main_thread():
        return _MATH_VERIFY_TIMEOUT_S
    return None


@functools.lru_cache(maxsize=4096)
def _parse_gold(answer: str, timeout: int | None) -> tuple:
    """Parses a reference answer given bare ("42", "\\frac{1}{2}", "[1, 3)") or in LaTeX math."""
    from math_verify import parse

    text = answer.strip()
    if not any(m in text for m in _BOXED_MARKERS):
        # Bare LaTeX is only extracted inside a math environment; boxing also keeps "[1, 3)" an
        # interval and "2, 3" a set instead of the last number.
        text = "$\\boxed{" + text.strip("$").strip() + "}$"
    return tuple(parse(text, parsing_timeout=timeout))


@functools.lru_cache(maxsize=1)
def _pred_config():
    from math_verify import LatexExtractionConfig

    return (LatexExtractionConfig(boxed_match_priority=0),)


def grade(response: str, answer: str) -> float:
    """1.0 if the response's boxed final answer is math-equivalent to `answer`, else 0.0.

    The response must contain a \\boxed{...} (the paper's system prompt asks for one); a response
    without one scores 0.0 even if the number appears in the text. `answer` may be bare
    ("42", "\\frac{1}{2}") or LaTeX ("$\\boxed{x}$"). Never raises: any error scores 0.0.
    Unbounded in time off the main thread: use `Grader` for a wall-clock bound.
    """
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException

    try:
        if not isinstance(response, str) or not isinstance(answer, str):
            return 0.0
        if not any(m in response for m in _BOXED_MARKERS):
            return 0.0
        timeout = _math_verify_timeout()
        gold = _parse_gold(answer, timeout)
        if not gold:
            return 0.0
        pred = parse(response, extraction_config=_pred_config(), parsing_timeout=timeout)
        if not pred:
            return 0.0
        return 1.0 if verify(list(gold), pred, timeout_seconds=timeout) else 0.0
    except (Exception, TimeoutException):  # TimeoutException derives from BaseException
        return 0.0


def _faulty_grade_for_tests(response: str, answer: str) -> float:
    """`grade`, except the response "__hang__" sleeps forever and "__crash__" kills the worker."""
    if response == "__hang__":
        while True:
            time.sleep(3600)
    if response == "__crash__":
        os._exit(1)
    return grade(response, answer)


# ---- worker process side -------------------------------------------------------------------

_READY_BARRIER = None


def _exit_when_orphaned(parent_pid: int, period_s: float = 1.0) -> None:
    # A parent killed with SIGKILL (preemption, OOM, kill -9) cannot stop the pool; an idle
    # worker sees its pipe close, but one stuck in a hung item would run on forever.
    while os.getppid() == parent_pid:
        time.sleep(period_s)
    os._exit(0)


def _init_worker(barrier) -> None:
    global _READY_BARRIER
    _READY_BARRIER = barrier
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    grade("\\boxed{1}", "1")  # imports sympy/math-verify and builds the LaTeX parser up front


def _wait_ready(timeout_s: float) -> int:
    # Each worker blocks here until all have started, so the startup tasks land one per worker.
    _READY_BARRIER.wait(timeout_s)
    return os.getpid()


# ---- parent side ---------------------------------------------------------------------------


class Grader:
    """Grades batches in a pool of worker processes with a per-item wall-clock deadline.

    Use as a context manager (or call `close`). Not thread-safe: one `grade_batch` at a time.
    The pool is pebble's `ProcessPool`: each item runs alone in a worker, its deadline counts
    from the moment a worker starts it, and an item past its deadline has its worker killed and
    replaced (a hung worker cannot be interrupted otherwise) and scores 0.0. An item whose worker
    dies under it (segfault, OOM kill) scores 0.0 too; the other items are not affected.

    Args:
      max_workers: worker processes (default min(8, cpu_count)).
      start_method: "spawn" or "forkserver"; never "fork" (forking a process that has started
        JAX's threads can deadlock).
      startup_timeout_s: how long (re)starting the pool may take before RuntimeError.
      _grade_fn: module-level (picklable) `(response, answer) -> float`, for tests.
    Attributes:
      num_restarts: workers replaced after a timeout or a crash (for logging).
      worker_pids: the pids of the workers the pool started with.
    """

    def __init__(
        self,
        max_workers: int | None = None,
        *,
        start_method: str = "spawn",
        startup_timeout_s: float = 120.0,
        _grade_fn: GradeFn = grade,
    ):
        if max_workers is None:
            max_workers = min(8, os.cpu_count() or 1)
        if int(max_workers) != max_workers or max_workers < 1:
            raise ValueError(f"max_workers must be a positive integer, got {max_workers}")
        if start_method not in ("spawn", "forkserver"):
            raise ValueError(f"start_method must be 'spawn' or 'forkserver', got {start_method!r}")
        if not startup_timeout_s > 0:
            raise ValueError(f"startup_timeout_s must be > 0, got {startup_timeout_s}")
        self._max_workers = int(max_workers)
        self._ctx = multiprocessing.get_context(start_method)
        self._startup_timeout_s = float(startup_timeout_s)
        self._grade_fn = _grade_fn
        self._pool: pebble.ProcessPool | None = None
        self._closed = False
        self.num_restarts = 0
        self.worker_pids: list[int] = []
        self._start()

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stops the workers; the Grader cannot be used afterwards."""
        self._closed = True
        self._stop()

    def _stop(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            pool.stop()
            pool.join()

    def _start(self) -> pebble.ProcessPool:
        if self._pool is not None and self._pool.active:
            return self._pool
        self._stop()  # a pool whose channels broke (pebble: BrokenProcessPool) is replaced
        pool = pebble.ProcessPool(self._max_workers, initializer=_init_worker,
                                  initargs=(self._ctx.Barrier(self._max_workers),),
                                  context=self._ctx)
        # One startup task per worker: every worker has imported math-verify before the first
        # item, and a pool that cannot start (no `__main__` guard under spawn) fails here.
        ready = [pool.schedule(_wait_ready, (self._startup_timeout_s,))
                 for _ in range(self._max_workers)]
        done, not_done = futures.wait(ready, timeout=self._startup_timeout_s + 5.0)
        errors = [f.exception() for f in done if f.exception() is not None]
        if not_done or errors:
            pool.stop()
            pool.join()
            raise RuntimeError(
                f"grading pool of {self._max_workers} workers did not start within "
                f"{self._startup_timeout_s} s"
                + (f": {errors[0]!r}" if errors else "")
                + " (scripts using spawn need an `if __name__ == '__main__':` guard)"
            )
        self.worker_pids = sorted(f.result() for f in ready)
        self._pool = pool
        return pool

    def grade_batch(
        self, responses: Sequence[str], answers: Sequence[str], timeout_s: float = 5.0
    ) -> np.ndarray:
        """Returns float32 rewards [len(responses)] in {0.0, 1.0}; each item <= timeout_s s."""
        if len(responses) != len(answers):
            raise ValueError(
                f"responses and answers must have the same length, got {len(responses)} "
                f"and {len(answers)}"
            )
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError(f"timeout_s must be a finite number > 0, got {timeout_s}")
        if self._closed:
            raise RuntimeError("Grader is closed")
        pool = self._start()
        pending = [pool.schedule(self._grade_fn, (r, a), timeout=timeout_s)
                   for r, a in zip(responses, answers)]
        rewards_b = np.zeros(len(responses), np.float32)
        for item, fut in enumerate(pending):
            try:
                rewards_b[item] = 1.0 if float(fut.result()) == 1.0 else 0.0
            except (TimeoutError, pebble.ProcessExpired):  # pebble replaced the worker
                self.num_restarts += 1
            except Exception:  # noqa: BLE001 - a reward is 0.0 whatever went wrong
                pass
        return rewards_b


def grade_batch(
    responses: Sequence[str],
    answers: Sequence[str],
    timeout_s: float = 5.0,
    max_workers: int | None = None,
) -> np.ndarray:
    """One-shot `Grader(max_workers).grade_batch(...)`; pays pool start-up (seconds) per call,
    so a training loop should hold one `Grader` instead."""
    with Grader(max_workers) as grader:
        return grader.grade_batch(responses, answers, timeout_s)


# ---- metrics -------------------------------------------------------------------------------


def _as_count(name: str, value) -> int:
    try:
        count = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if count < 0:
        raise ValueError(f"{name} must be >= 0, got {count}")
    return count


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al. 2021), which never forms the
    binomials, so it is exact to rounding for any n. Requires 1 <= k <= n and 0 <= c <= n.
    """
    n, c, k = _as_count("n", n), _as_count("c", c), _as_count("k", k)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k must be <= n (number of samples), got k={k} > n={n}")
    if c > n:
        raise ValueError(f"c (number correct) must be <= n, got c={c} > n={n}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    i = np.arange(n - c + 1, n + 1, dtype=np.float64)
    return float(1.0 - np.prod(1.0 - k / i))


def _as_correct_pn(correct_pn) -> np.ndarray:
    correct_pn = np.asarray(correct_pn)
    if correct_pn.ndim != 2 or correct_pn.shape[0] == 0 or correct_pn.shape[1] == 0:
        raise ValueError(
            f"correct_pn must be a non-empty [problems, samples] array, got shape "
            f"{correct_pn.shape}"
        )
    if not np.all((correct_pn == 0) | (correct_pn == 1)):
        raise ValueError("correct_pn must hold only 0/1 (or False/True) values")
    return correct_pn.astype(np.int64)


def pass_at_1_mean(correct_pn) -> float:
    """Mean over problems of the fraction of a problem's n samples that are correct."""
    return float(_as_correct_pn(correct_pn).mean(axis=1, dtype=np.float64).mean())


def pass_at_k_mean(correct_pn, k: int) -> float:
    """Mean over problems of `pass_at_k(n, c_p, k)`, with n = samples per problem."""
    correct_pn = _as_correct_pn(correct_pn)
    n = correct_pn.shape[1]
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct_pn.sum(axis=1)]))


def auroc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative), ties counted 1/2.

    scores: [N] real (+-inf allowed, NaN not); labels: [N] in {0, 1}. NaN if a class is empty.
    Mann-Whitney U from average ranks: O(N log N).
    """
    from scipy.stats import rankdata

    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels)
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"scores and labels must be 1-D of the same length, got shapes {scores.shape} "
            f"and {labels.shape}"
        )
    if np.isnan(scores).any():
        raise ValueError("scores must not contain NaN")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must hold only 0/1 (or False/True) values")
    positive = labels == 1
    n_pos = int(positive.sum())
    n_neg = scores.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(scores)  # average ranks: a tie between classes adds 1/2 a pair
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
