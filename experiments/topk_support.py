"""Ablation of the top-k support of the OPD loss: renormalised vs tail bucket, paired by seed.

    python experiments/topk_support.py [--seeds 5] [--method trb] [--final-samples 4]

Runs configs/toy.py:method=M,seed=S with objective.topk_support = renormalized and = tail_bucket
for every seed, all in this process (shared compiled programs). Pairs share the seed, so the
prompt order, the initial rollout keys and the models are the same; only the loss differs.
Writes experiments/results/topk_support.json (per run: final pass@1, mean reward over the last
25 updates, mean teacher log-prob of the rollouts; paired differences with 95% t intervals).
With --final-samples N each final checkpoint is also re-evaluated on all 500 test problems x N
samples with sampling seed 0 (as experiments/final_eval.py; the periodic evaluation is noisy).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from scipy import stats

import common
from trb_jax import config as config_lib
from trb_jax import trainer

SUPPORTS = ("renormalized", "tail_bucket")


def summary(workdir: str) -> dict:
    evals = common.read_jsonl(os.path.join(workdir, "eval.jsonl"))
    m = common.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    key = common.pass_key(evals[0])
    return {"final_pass@1": evals[-1][key],
            "pass@1": {e["step"]: e[key] for e in evals},
            "reward_last25": float(np.mean([r["reward"] for r in m[-25:]])),
            "teacher_logprob_mean": float(np.mean([r["teacher_logprob"] for r in m]))}


def final_pass(workdir: str, method: str, seed: int, support: str, samples: int) -> float:
    cd = common.toy_config(method, seed, {"objective.topk_support": support})
    cd.eval.datasets.toy_test.max_examples = 500
    cd.eval.num_samples = samples
    cd.eval.batch_size = 256
    out, _ = trainer.evaluate_run(config_lib.to_run_config(cd, workdir=workdir), workdir, seed=0)
    return out["datasets"]["toy_test"]["metrics"]["pass@1"]


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    d = b - a
    n = len(d)
    half = float(stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean_diff": float(d.mean()), "ci95": half, "n": n,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--method", default="trb")
    ap.add_argument("--final-samples", type=int, default=0)
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    runs = {}
    for seed in seeds:  # seed-major: complete pairs first
        for support in SUPPORTS:
            name = f"topk_support/{args.method}_{support}_seed{seed}"
            common.run(name, args.method, seed, {"objective.topk_support": support})
            runs[(support, seed)] = os.path.join(common.DEFAULT_OUT, name)
    results = {f"{sup}/seed{s}": summary(runs[(sup, s)]) for sup in SUPPORTS for s in seeds}
    metrics = ["final_pass@1", "reward_last25", "teacher_logprob_mean"]
    if args.final_samples:
        for sup in SUPPORTS:
            for s in seeds:
                results[f"{sup}/seed{s}"]["pass@1_500x"] = final_pass(
                    runs[(sup, s)], args.method, s, sup, args.final_samples)
        metrics.append("pass@1_500x")
    table = {}
    for metric in metrics:
        a, b = (np.array([results[f"{sup}/seed{s}"][metric] for s in seeds]) for sup in SUPPORTS)
        table[metric] = {"renormalized": float(a.mean()), "tail_bucket": float(b.mean()),
                         "tail_minus_renorm": paired(a, b)}
        print(f"{metric:22s} renorm {a.mean():.4f}  tail {b.mean():.4f}  "
              f"diff {table[metric]['tail_minus_renorm']['mean_diff']:+.4f} "
              f"+- {table[metric]['tail_minus_renorm']['ci95']:.4f}", flush=True)
    results["table"] = table
    results["method"] = args.method
    common.write_json(os.path.join(common.ROOT, "experiments", "results", "topk_support.json"),
                      results)


if __name__ == "__main__":
    main()
