"""Short tuning of the toy OPD learning rate and batch (seed 0), which chose configs/toy.py's
learning rate. Writes experiments/results/tune_lr.json (experiments/results_hard/ with
--world hard).

    python experiments/tune_lr.py                                   # the default world
    python experiments/tune_lr.py --world hard --methods vanilla    # hard world: vanilla only
"""

from __future__ import annotations

import argparse
import os

import common

# 150 updates, evaluations every 25 (the configs/toy.py defaults at the time were 150 / 25).
GRID = [
    {"optim.peak_lr": 1e-3, "rollout.prompts_per_step": 32},
    {"optim.peak_lr": 3e-3, "rollout.prompts_per_step": 32},
]
COMMON = {"train.num_steps": 150, "optim.decay_steps": 150, "train.eval_every": 25,
          "method.warmup_steps": 50, "train.checkpoint_every": 50}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    ap.add_argument("--methods", default="vanilla,trb",
                    help="methods tuned (the hard world's pre-registration tunes vanilla only)")
    args = ap.parse_args(argv)
    common.set_world(args.world)
    names = args.methods.split(",")
    if args.dry_run:
        return common.dry_run({"runs": [f"tune/{m}_{i}" for i in range(len(GRID)) for m in names],
                               "results": common.results_path("tune_lr.json")})
    rows = []
    for i, overrides in enumerate(GRID):
        for method in names:
            w = common.run(f"tune/{method}_{i}", method, 0, {**COMMON, **overrides})
            evals = common.read_jsonl(os.path.join(w, "eval.jsonl"))
            key = common.pass_key(evals[0])
            rows.append({"method": method, **overrides,
                         "pass@1": [(e["step"], e[key]) for e in evals]})
            print(rows[-1], flush=True)
    common.write_json(common.results_path("tune_lr.json"), rows)


if __name__ == "__main__":
    main()
