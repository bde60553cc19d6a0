"""Short tuning of the toy OPD learning rate and batch (seed 0, vanilla and TRB), which chose
configs/toy.py's learning rate. Writes experiments/results/tune_lr.json.

    python experiments/tune_lr.py
"""

from __future__ import annotations

import os

import common

# 150 updates, evaluations every 25 (the configs/toy.py defaults at the time were 150 / 25).
GRID = [
    {"optim.peak_lr": 1e-3, "rollout.prompts_per_step": 32},
    {"optim.peak_lr": 3e-3, "rollout.prompts_per_step": 32},
]
COMMON = {"train.num_steps": 150, "optim.decay_steps": 150, "train.eval_every": 25,
          "method.warmup_steps": 50, "train.checkpoint_every": 50}


def main() -> None:
    rows = []
    for i, overrides in enumerate(GRID):
        for method in ("vanilla", "trb"):
            w = common.run(f"tune/{method}_{i}", method, 0, {**COMMON, **overrides})
            evals = common.read_jsonl(os.path.join(w, "eval.jsonl"))
            key = common.pass_key(evals[0])
            rows.append({"method": method, **overrides,
                         "pass@1": [(e["step"], e[key]) for e in evals]})
            print(rows[-1], flush=True)
    common.write_json(os.path.join(common.ROOT, "experiments", "results", "tune_lr.json"), rows)


if __name__ == "__main__":
    main()
