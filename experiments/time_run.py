"""Compute cost of one toy OPD run, measured at small scale and extrapolated to a suite.

    nice -n 19 python experiments/time_run.py --world hard [--method vanilla] [--updates 6]

Trains `--updates` updates of configs/toy.py (the selected world, the method's settings, seed
0) in runs/experiments[_hard]/timing/, reads the per-update times from its metrics.jsonl (the
first update, which compiles, is reported apart), then times one evaluation of the final
checkpoint with the config's periodic protocol (128 test problems x 2 samples) and one with
experiments/final_eval.py's (500 x 4). Prints and writes experiments/results[_hard]/
time_run.json with the extrapolation to a full run (num_steps updates, an evaluation every
eval_every updates and at update 0) and to the pre-registered suite (docs/results.md). It reads
no accuracy: it is a cost measurement (vanilla by default: the only method the pre-registration
lets us look at before the suite).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np

import common
from trb_jax import config as config_lib
from trb_jax import trainer


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    ap.add_argument("--method", default="vanilla")
    ap.add_argument("--updates", type=int, default=6)
    args = ap.parse_args(argv)
    common.set_world(args.world)
    name = f"timing/{args.method}_{args.updates}u"
    if args.dry_run:
        return common.dry_run({"runs": [name], "results": common.results_path("time_run.json")})
    full = common.toy_config(args.method, 0)
    overrides = {"train.num_steps": args.updates, "optim.decay_steps": args.updates,
                 "train.eval_every": 0, "train.checkpoint_every": args.updates}
    workdir = os.path.join(common.DEFAULT_OUT, name)
    shutil.rmtree(workdir, ignore_errors=True)  # a fresh measurement every time
    start = time.perf_counter()
    common.run(name, args.method, 0, overrides)
    run_s = time.perf_counter() - start
    m = common.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    per_update = [r["time_rollout_s"] + r["time_update_s"] + r["time_scoring_s"] for r in m]
    steady = float(np.median(per_update[1:]))
    out = {"world": common.WORLD, "method": args.method, "updates": args.updates,
           "run_wall_s": round(run_s, 1), "first_update_s": round(per_update[0], 1),
           "update_s_median": round(steady, 2),
           "response_tokens_mean": float(np.mean([r.get("response_length", np.nan)
                                                  for r in m])),
           "load_avg_1min_at_end": os.getloadavg()[0]}
    for label, n_problems, samples in (("eval_periodic", 128, 2), ("eval_final", 500, 4)):
        cd = common.toy_config(args.method, 0, overrides)
        cd.eval.datasets.toy_test.max_examples = n_problems
        cd.eval.num_samples = samples
        cd.eval.batch_size = 256 if label == "eval_final" else cd.eval.batch_size
        cfg = config_lib.to_run_config(cd, workdir=workdir)
        t = time.perf_counter()
        trainer.evaluate_run(cfg, workdir, seed=0)
        out[f"{label}_s"] = round(time.perf_counter() - t, 1)
    n, every = int(full.train.num_steps), int(full.train.eval_every)
    n_evals = 1 + (n // every if every else 1)
    one_run = out["first_update_s"] + (n - 1) * steady + n_evals * out["eval_periodic_s"]
    out["full_run_estimate_s"] = round(one_run, 0)
    out["full_run_updates"], out["full_run_evals"] = n, n_evals
    # The pre-registered suite (docs/results.md): lr tuning (vanilla, 2 lrs x 150 updates),
    # vanilla and trb x 5 seeds, 11 re-evaluations on 500 x 4 (10 runs + the Base student),
    # and the rollout-only diagnostics: eps sweep (6 eps x 512 prompts) and prefix probe (5
    # lengths x 2 prefix sources x 2 continuers x 256 problems x 4 continuations), costed at
    # the final evaluation's rate per sampled response.
    runs = 2 * 150 / n + 10
    per_sample = out["eval_final_s"] / 2000
    rollouts = (6 * 512 + 5 * 2 * 2 * 256 * 4) * per_sample
    out["suite_estimate_s"] = round(runs * one_run + 11 * out["eval_final_s"] + rollouts, 0)
    out["suite_runs_equivalent"] = runs
    print(out, flush=True)
    common.write_json(common.results_path("time_run.json"), out)


if __name__ == "__main__":
    main()
