"""Behavior x objective on the toy world: vanilla, trb, tropd, trb + tropd, paired by seed.

    python experiments/objectives.py [--seeds 5] [--variant-seeds 3] [--final-samples 4]

Arms (configs/toy.py; only method.name and objective.* differ, so a seed fixes the prompt
order, the initial rollout keys and the models of every arm):

    vanilla      method vanilla, objective opd
    trb          method trb,     objective opd
    tropd        method vanilla, objective tropd (outlier = mask: Mask Outlier)
    trb+tropd    method trb,     objective tropd
    tropd_clip   method vanilla, objective tropd with outlier = clip (Clip Outlier), on the
                 first --variant-seeds seeds (the mask variant is `tropd` on the same seeds)
    tropd_lr3e-4, tropd_lr1e-4   tropd at a lower peak learning rate (the toy's 1e-3 was tuned
                 on vanilla OPD), on the first --variant-seeds seeds
    k1_only      tropd with every token in the trust region (threshold 1e-30): the plain K1
                 policy gradient of the reverse KL, no outlier handling (first --variant-seeds)

All runs share this process (compiled programs are reused); finished runs are skipped when the
script is re-run. With --final-samples N every final checkpoint is re-evaluated on the 500 test
problems x N samples with sampling seed 0 (the periodic evaluation is noisy). Writes
experiments/results/objectives.json (per run: final pass@1, the 500 x N pass@1, mean reward over
the last 25 updates, and TrOPD's diagnostics — gradient norm, policy entropy, share of tokens in
the trust region, the K1 estimate — as means over the run; paired differences with 95% t
intervals) and docs/img/objectives.png, objectives_diagnostics.png, objectives_trust_region.png.
"""

from __future__ import annotations

import argparse
import ast
import json
import os

import numpy as np

import common
from topk_support import paired
from trb_jax import config as config_lib
from trb_jax import plotting, trainer

ARMS = {
    "vanilla": ("vanilla", {}),
    "trb": ("trb", {}),
    "tropd": ("vanilla", {"objective.name": "tropd"}),
    "trb+tropd": ("trb", {"objective.name": "tropd"}),
    "tropd_clip": ("vanilla", {"objective.name": "tropd", "objective.outlier": "clip"}),
    # TrOPD at lower learning rates (configs/toy.py's 1e-3 was tuned on vanilla OPD)
    "tropd_lr3e-4": ("vanilla", {"objective.name": "tropd", "optim.peak_lr": 3e-4}),
    "tropd_lr1e-4": ("vanilla", {"objective.name": "tropd", "optim.peak_lr": 1e-4}),
    # every token in the trust region: the plain K1 policy gradient of the reverse KL
    "k1_only": ("vanilla", {"objective.name": "tropd", "objective.trust_threshold": 1e-30}),
}
VARIANTS = ("tropd_clip", "tropd_lr3e-4", "tropd_lr1e-4", "k1_only")
# (arm b, arm a): the differences b - a the verdicts read
COMPARISONS = [("trb", "vanilla"), ("tropd", "vanilla"), ("trb+tropd", "vanilla"),
               ("trb+tropd", "tropd"), ("trb+tropd", "trb"), ("tropd_clip", "tropd"),
               ("tropd_lr3e-4", "vanilla"), ("tropd_lr1e-4", "vanilla"), ("k1_only", "tropd")]
DIAGNOSTICS = ("grad_norm", "student_entropy", "trust_share", "k1", "reward", "teacher_logprob")


def run_name(arm: str, seed: int) -> str:
    return f"objectives/{arm.replace('+', '_')}_seed{seed}"


def summary(workdir: str) -> dict:
    evals = common.read_jsonl(os.path.join(workdir, "eval.jsonl"))
    m = common.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    key = common.pass_key(evals[0])
    out = {"final_pass@1": evals[-1][key], "pass@1": {e["step"]: e[key] for e in evals},
           "reward_last25": float(np.mean([r["reward"] for r in m[-25:]]))}
    for name in DIAGNOSTICS:
        values = [r[name] for r in m if r.get(name) is not None]
        out[f"{name}_mean"] = float(np.mean(values)) if values else None
    return out


def final_pass(workdir: str, arm: str, seed: int, samples: int) -> float:
    """pass@1 of the final checkpoint on 500 test problems x `samples` (sampling seed 0), cached
    in WORKDIR/final_500x<samples>.json."""
    cache = os.path.join(workdir, f"final_500x{samples}.json")
    if os.path.exists(cache):
        with open(cache) as f:
            return json.load(f)["pass@1"]
    value = _final_pass(workdir, arm, seed, samples)
    common.write_json(cache, {"pass@1": value})
    return value


def _final_pass(workdir: str, arm: str, seed: int, samples: int) -> float:
    method, overrides = ARMS[arm]
    cd = common.toy_config(method, seed, overrides)
    cd.eval.datasets.toy_test.max_examples = 500
    cd.eval.num_samples = samples
    cd.eval.batch_size = 256
    out, _ = trainer.evaluate_run(config_lib.to_run_config(cd, workdir=workdir), workdir, seed=0)
    return out["datasets"]["toy_test"]["metrics"]["pass@1"]


def arm_seeds(arm: str, seeds: list[int], variant_seeds: int) -> list[int]:
    return seeds[:variant_seeds] if arm in VARIANTS else seeds


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--variant-seeds", type=int, default=3)
    ap.add_argument("--final-samples", type=int, default=0)
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--out", default=common.DEFAULT_OUT, help="run directories")
    ap.add_argument("--results", default=os.path.join(common.ROOT, "experiments", "results",
                                                      "objectives.json"))
    ap.add_argument("--plots", default=os.path.join(common.ROOT, "docs", "img"))
    ap.add_argument("--override", action="append", default=[],
                    help="extra dotted config override PATH=VALUE for every arm (small runs)")
    args = ap.parse_args(argv)
    arms = args.arms.split(",")
    extra = {}
    for item in args.override:
        path, value = item.split("=", 1)
        try:
            extra[path] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[path] = value
    seeds = list(range(args.seeds))
    runs: dict[tuple[str, int], str] = {}
    for seed in seeds:  # seed-major: complete pairs first
        for arm in arms:
            if seed not in arm_seeds(arm, seeds, args.variant_seeds):
                continue
            method, overrides = ARMS[arm]
            workdir = common.run(run_name(arm, seed), method, seed, {**overrides, **extra}, out=args.out)
            if workdir is None:
                raise SystemExit(f"{run_name(arm, seed)} is being trained by another process")
            runs[(arm, seed)] = workdir
    results: dict = {f"{arm}/seed{s}": summary(w) for (arm, s), w in runs.items()}
    metrics = ["final_pass@1", "reward_last25", "grad_norm_mean", "student_entropy_mean"]
    if args.final_samples:
        for (arm, s), w in runs.items():
            results[f"{arm}/seed{s}"]["pass@1_500x"] = final_pass(w, arm, s, args.final_samples)
        metrics.append("pass@1_500x")
    table: dict = {"arms": {}, "paired": {}}
    for arm in arms:
        rows = [results[f"{arm}/seed{s}"] for s in arm_seeds(arm, seeds, args.variant_seeds)]
        table["arms"][arm] = {m: float(np.mean([r[m] for r in rows])) for m in metrics}
        table["arms"][arm]["seeds"] = len(rows)
        for name in ("trust_share_mean", "k1_mean"):
            if rows[0].get(name) is not None:
                table["arms"][arm][name] = float(np.mean([r[name] for r in rows]))
    for b, a in COMPARISONS:
        if a not in arms or b not in arms:
            continue
        common_seeds = [s for s in arm_seeds(b, seeds, args.variant_seeds)
                        if s in arm_seeds(a, seeds, args.variant_seeds)]
        for m in metrics:
            va, vb = (np.array([results[f"{x}/seed{s}"][m] for s in common_seeds]) for x in (a, b))
            table["paired"].setdefault(f"{b} - {a}", {})[m] = paired(va, vb)
    results["table"] = table
    for arm, row in table["arms"].items():
        print(f"{arm:11s} " + "  ".join(f"{m} {v:.4f}" for m, v in row.items() if v is not None), flush=True)
    for name, row in table["paired"].items():
        key = "pass@1_500x" if "pass@1_500x" in row else "final_pass@1"
        print(f"{name:22s} {key} {row[key]['mean_diff']:+.4f} +- {row[key]['ci95']:.4f} "
              f"({row[key]['wins']}/{row[key]['n']} seeds up)", flush=True)
    common.write_json(args.results, results)
    groups = {arm: [runs[(arm, s)] for s in arm_seeds(arm, seeds, args.variant_seeds)] for arm in arms}
    plotting.plot_curves(groups, [("toy_test/pass@1", "eval", "pass@1 (periodic eval)"),
                                  ("reward", "metrics", "rollout reward")],
                         os.path.join(args.plots, "objectives.png"), smooth=10,
                         title="behavior x objective, toy world (mean, 95% CI over seeds)")
    plotting.plot_curves(groups, [("grad_norm", "metrics", "gradient norm (before clipping)"),
                                  ("student_entropy", "metrics", "policy entropy (nats)")],
                         os.path.join(args.plots, "objectives_diagnostics.png"), smooth=10,
                         title="gradient norm and policy entropy (mean, 95% CI over seeds)")
    tropd_groups = {arm: runs for arm, runs in groups.items() if "tropd" in arm}
    if tropd_groups:
        plotting.plot_curves(tropd_groups, [("trust_share", "metrics", "share of tokens in the trust region"),
                                            ("k1", "metrics", "K1 estimate of KL(pi_S || pi_T)")],
                             os.path.join(args.plots, "objectives_trust_region.png"), smooth=10,
                             title="TrOPD arms (mean, 95% CI over seeds)")
    return results


if __name__ == "__main__":
    main()
