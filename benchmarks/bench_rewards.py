"""Grading throughput of trb_jax.rewards: in-process vs the timeout-bounded process pool.

Command (CPU):
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_rewards.py
Writes benchmarks/results/rewards.json (machine, command, raw batch times) and prints a table.

Batch: 200 responses of ~1,500 characters of LaTeX reasoning ending in \\boxed{...}, half right,
over 8 answer kinds (integers, fractions vs decimals, radicals, polynomials, intervals, pi).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from trb_jax import rewards  # noqa: E402

ANSWERS = ["42", "\\frac{3}{4}", "2\\sqrt{5}", "x^2 - 1", "[0, 2)", "\\frac{\\pi}{3}", "17", "0.25"]
RIGHT = ["42", "0.75", "\\sqrt{20}", "(x-1)(x+1)", "[0,2)", "\\pi/3", "17", "\\frac{1}{4}"]
WRONG = ["41", "\\frac{4}{3}", "5\\sqrt{2}", "x^2+1", "(0,2]", "\\frac{\\pi}{6}", "71", "0.5"]
STEP = ("We have $a_{n+1} = 2a_n + 1$, so $a_n + 1 = 2^{n}(a_0 + 1)$. Substituting "
        "$\\frac{x^2 - 1}{x + 1} = x - 1$ and checking $x \\neq -1$, the condition becomes "
        "$\\sqrt{b^2 - 4ac} \\geq 0$. ")


def make_batch(n: int) -> tuple[list[str], list[str]]:
    responses, golds = [], []
    for i in range(n):
        j = i % len(ANSWERS)
        final = RIGHT[j] if i % 2 == 0 else WRONG[j]
        gold = ANSWERS[j]
        if j == 6:  # unique integers, so not every boxed string hits math-verify's parse cache
            gold, final = str(100 + i), str(100 + i if i % 2 == 0 else 99 + i)
        responses.append(f"Problem {i}. " + STEP * 8
                         + f"Therefore, the final answer is $\\boxed{{{final}}}$.")
        golds.append(gold)
    return responses, golds


def main() -> dict:
    responses, golds = make_batch(200)
    n = len(responses)
    res: dict = {"batch": n, "mean_response_chars": float(np.mean([len(r) for r in responses]))}
    t0 = time.perf_counter()
    serial = np.array([rewards.grade(r, g) for r, g in zip(responses, golds)])
    res["in_process_serial_s"] = time.perf_counter() - t0
    res["in_process_items_per_s"] = n / res["in_process_serial_s"]
    for workers in (1, 2):
        t0 = time.perf_counter()
        grader = rewards.Grader(max_workers=workers)
        startup = time.perf_counter() - t0
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            out = grader.grade_batch(responses, golds, timeout_s=5.0)
            times.append(time.perf_counter() - t0)
            assert (out == serial).all(), "pool grades differ from in-process grades"
        grader.close()
        res[f"grader_{workers}_workers"] = {"startup_s": startup, "batch_s": times,
                                            "items_per_s": [n / t for t in times],
                                            "restarts": grader.num_restarts}
    res["accuracy"] = float(serial.mean())
    payload = {"benchmark": "rewards",
               "command": "JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_rewards.py",
               "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                           "python": platform.python_version()},
               "results": res}
    out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "rewards.json")
    with open(out_path, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"in-process: {res['in_process_items_per_s']:.0f} items/s")
    for w in (1, 2):
        r = res[f"grader_{w}_workers"]
        print(f"Grader {w} worker(s): startup {r['startup_s']:.2f} s, batches "
              + ", ".join(f"{t:.3f} s ({n / t:.0f}/s)" for t in r["batch_s"]))
    return payload


if __name__ == "__main__":  # spawned grader workers re-import this module
    main()
