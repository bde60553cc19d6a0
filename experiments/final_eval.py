"""Final pass@1 of every finished experiment run on the WHOLE toy test split, with more samples.

    python experiments/final_eval.py [--samples 4] [--glob 'methods/*'] [--world hard]

The periodic evaluation during training (128 problems x 2 samples) is cheap but noisy (one
run's pass@1 has a standard error of about 0.025). This re-evaluates each run's final
checkpoint on all 500 test problems x `--samples` samples (fixed sampling seed 0, so every
run sees the same keys), then writes experiments/results/final_eval.json (results_hard/ with
--world hard, whose runs live in runs/experiments_hard) and prints a
markdown table per method: mean over seeds +- 95% t interval, and the paired difference to
vanilla (same seed) with its 95% interval.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re

import numpy as np

import common
from trb_jax import config as config_lib
from trb_jax import plotting, trainer


def result_path() -> str:
    return common.results_path("final_eval.json")


def evaluate(workdir: str, method: str, seed: int, samples: int, overrides: dict) -> dict:
    cd = common.toy_config(method, seed, overrides)
    cd.eval.datasets.toy_test.max_examples = 500
    cd.eval.num_samples = samples
    cd.eval.batch_size = 256
    cfg = config_lib.to_run_config(cd, workdir=workdir)
    out, _ = trainer.evaluate_run(cfg, workdir, seed=0)
    return out["datasets"]["toy_test"]["metrics"]


def interval(values_n: np.ndarray) -> str:
    """' +- half-width' of the 95% t interval, or '' for one value (no interval exists)."""
    if len(values_n) < 2:
        return ""
    return f" +- {float(plotting.ci95(values_n[:, None])[0]):.3f}"


def by_group(results: dict) -> dict[str, dict[int, float]]:
    """{group: {seed: pass@1}} of result entries."""
    out: dict[str, dict[int, float]] = {}
    for r in results.values():
        out.setdefault(r["group"], {})[r["seed"]] = r["pass@1"]
    return out


def table(results: dict, base: dict[int, float] | None = None) -> str:
    """Markdown table: mean +- 95% t interval per group (none for a single run) and the
    difference to `base` (vanilla by default) paired by seed."""
    by_method = by_group(results)
    base = by_method.get("vanilla", {}) if base is None else base
    lines = ["| method | n | final pass@1 (mean +- 95% CI) | minus vanilla, paired by seed |",
             "|---|---|---|---|"]
    for group in sorted(by_method, key=lambda g: (g != "vanilla", g)):
        seeds = sorted(by_method[group])
        v = np.array([by_method[group][s] for s in seeds])
        diff = ""
        paired = [s for s in seeds if s in base]
        if group != "vanilla" and paired:
            d = np.array([by_method[group][s] - base[s] for s in paired])
            diff = f"{d.mean():+.3f}{interval(d)} (n={len(d)})"
        lines.append(f"| {group} | {len(v)} | {v.mean():.3f}{interval(v)} | {diff} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--glob", default="methods/*")
    args = ap.parse_args(argv)
    common.set_world(args.world)
    RESULT = result_path()
    if args.dry_run:
        return common.dry_run({
            "results": RESULT, "runs_glob": os.path.join(common.DEFAULT_OUT, args.glob),
            "max_new_tokens": int(common.toy_config("vanilla", 0).eval.max_new_tokens)})
    results = json.load(open(RESULT)) if os.path.exists(RESULT) else {}
    if "base_student" not in results:  # the untrained Base student, same protocol
        cd = common.toy_config("vanilla", 0)
        cd.eval.datasets.toy_test.max_examples = 500
        cd.eval.num_samples, cd.eval.batch_size = args.samples, 256
        base_dir = ("/tmp/trb_base_eval" if common.WORLD == "default"
                    else os.path.join(common.DEFAULT_OUT, "base_eval"))
        cfg = config_lib.to_run_config(cd, workdir=base_dir)
        out, _ = trainer.evaluate_run(cfg, base_dir, student=cfg.model.student,
                                      seed=0)
        results["base_student"] = {"group": "base", "seed": 0,
                                   **out["datasets"]["toy_test"]["metrics"]}
        common.write_json(RESULT, results)
    print(f"base student: pass@1 {results['base_student']['pass@1']:.3f}")
    for workdir in sorted(glob.glob(os.path.join(common.DEFAULT_OUT, args.glob))):
        name = os.path.relpath(workdir, common.DEFAULT_OUT)
        m = re.fullmatch(r"methods/(\w+?)_seed(\d+)", name) or re.fullmatch(
            r"eps/eps([\d.e-]+)_seed(\d+)", name)
        if m is None or name in results:
            continue
        if name.startswith("methods/"):
            method, seed, overrides, group = m[1], int(m[2]), {}, m[1]
        else:
            method, seed, overrides = "trb", int(m[2]), {"method.eps0": float(m[1])}
            group = f"trb eps0={m[1]}"
        cd = common.toy_config(method, seed, overrides)
        total = int(cd.train.num_steps) + (int(cd.method.sft_steps)
                                           if method == "sft_warmup" else 0)
        if not common.is_finished(workdir, total):
            continue
        metrics = evaluate(workdir, method, seed, args.samples, overrides)
        results[name] = {"group": group, "seed": seed, **metrics}
        print(name, round(metrics["pass@1"], 4), flush=True)
        common.write_json(RESULT, results)
    methods = {k: v for k, v in results.items() if k.startswith("methods/")}
    print(table(methods))
    eps = {k: v for k, v in results.items() if k.startswith("eps/")}
    if eps:  # single-seed eps_0 runs, paired with the vanilla run of the same seed
        print(table(eps, base=by_group(methods).get("vanilla", {})))


if __name__ == "__main__":
    main()
