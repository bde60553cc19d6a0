"""Benchmark the trust-region blend solver: bisection vs Newton, iterations and time per solve.

Command (CPU, float32):
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_blend.py [--repeats 20] [--quick]

Writes benchmarks/results/blend.json with the machine, the command and every raw timing, and
prints a markdown table (copied into docs/benchmarks.md).

Logits: student s ~ 4 N(0, 1), teacher t = 0.7 s + 3 N(0, 1) (correlated, LM-like spread),
eps cycled over the paper's grid {0.001, 0.005, 0.01, 0.02, 0.05} across rows.

"iters" is the solver's own count of D evaluations until a row's bracket closed (hi - lo <= tol).
"iters to 1e-6" is measured from outside: the smallest max_iters for which a row's returned beta
is within 1e-6 of beta* from the independent float64 PyTorch bisection (tests/references).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from trb_jax.blending import trust_region_blend  # noqa: E402

EPS_GRID = np.array([0.001, 0.005, 0.01, 0.02, 0.05], np.float32)


def make_inputs(rows: int, vocab: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    s = (4.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
    t = (0.7 * s + 3.0 * rng.standard_normal((rows, vocab))).astype(np.float32)
    eps = EPS_GRID[np.arange(rows) % len(EPS_GRID)]
    return s, t, eps


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }


def time_solver(s, t, eps, solver: str, repeats: int):
    fn = jax.jit(lambda s, t, e: trust_region_blend(s, t, e, solver=solver))
    s_d, t_d, e_d = jnp.asarray(s), jnp.asarray(t), jnp.asarray(eps)
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(s_d, t_d, e_d))
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(s_d, t_d, e_d))
        times.append(time.perf_counter() - t0)
    return out, compile_s, times


def iters_to_accuracy(s, t, eps, beta_star, solver: str, max_n: int = 40, tol: float = 1e-6):
    """Smallest max_iters at which each row's beta is within tol of beta_star (max_n+1 = never)."""
    need = np.full(len(beta_star), max_n + 1)
    for n in range(1, max_n + 1):
        beta = np.asarray(trust_region_blend(s, t, eps, solver=solver, max_iters=n).beta)
        hit = (np.abs(beta - beta_star) <= tol) & (need > max_n)
        need[hit] = n
        if (need <= max_n).all():
            break
    return need


def reference_beta(s, t, eps):
    import torch
    from references.torch_reference import torch_blend

    _, beta, _ = torch_blend(torch.from_numpy(s).double(), torch.from_numpy(t).double(),
                             torch.from_numpy(eps).double(), iters=60)
    return beta.numpy()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "blend.json"))
    args = parser.parse_args(argv)

    vocabs = [4096] if args.quick else [32_768, 151_936]
    row_counts = [1, 8] if args.quick else [1, 8, 64]
    results = []
    for vocab in vocabs:
        for rows in row_counts:
            s, t, eps = make_inputs(rows, vocab)
            beta_star = reference_beta(s, t, eps)
            for solver in ("bisection", "newton"):
                out, compile_s, times = time_solver(s, t, eps, solver, args.repeats)
                iters = np.asarray(out.iters)
                need = iters_to_accuracy(s, t, eps, beta_star, solver)
                err = np.abs(np.asarray(out.beta) - beta_star)
                row = {
                    "vocab": vocab,
                    "rows": rows,
                    "solver": solver,
                    "compile_s": compile_s,
                    "times_s": times,
                    "median_ms": 1e3 * float(np.median(times)),
                    "median_us_per_row": 1e6 * float(np.median(times)) / rows,
                    "iters_bracket": iters.tolist(),
                    "iters_bracket_median": float(np.median(iters)),
                    "iters_to_1e-6": need.tolist(),
                    "iters_to_1e-6_median": float(np.median(need)),
                    "max_abs_beta_err": float(err.max()),
                }
                results.append(row)
                print(f"V={vocab:>7} rows={rows:>3} {solver:>9}: {row['median_ms']:8.2f} ms "
                      f"iters(bracket) {row['iters_bracket_median']:.0f} "
                      f"iters(to 1e-6) {row['iters_to_1e-6_median']:.0f} "
                      f"max|beta-beta*| {row['max_abs_beta_err']:.1e}", flush=True)

    payload = {
        "benchmark": "blend",
        "command": "JAX_PLATFORMS=cpu python benchmarks/bench_blend.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine_info(),
        "inputs": "s ~ 4 N(0,1), t = 0.7 s + 3 N(0,1), float32; eps cycled over "
        + str(EPS_GRID.tolist()),
        "results": results,
    }
    if not args.quick:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=1)
    print("\n| V | rows | solver | median ms / solve | us / row | iters (bracket, median) "
          "| iters to 1e-6 (median) | max abs beta err |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['vocab']:,} | {r['rows']} | {r['solver']} | {r['median_ms']:.2f} | "
              f"{r['median_us_per_row']:.0f} | {r['iters_bracket_median']:.0f} | "
              f"{r['iters_to_1e-6_median']:.0f} | {r['max_abs_beta_err']:.1e} |")
    return payload


if __name__ == "__main__":
    main()
