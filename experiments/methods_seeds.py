"""Every warmup method x seeds on the toy world: mean +- 95% CI curves and final pass@1.

    python experiments/methods_seeds.py [--seeds 5] [--methods vanilla,trb,...] [--world hard]

Runs configs/toy.py:method=M,seed=S for every pair (same budget: num_steps OPD updates each;
sft_warmup adds its SFT updates before them), all in this process (shared compiled programs).
Writes experiments/results/methods_seeds.json (experiments/results_hard/ with --world hard; per run: pass@1 at every evaluation, mean reward
over the last 25 updates, teacher log-prob over the warmup) and docs/img/methods_seeds.png
(docs/img/hard/ for the hard world).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import common
from trb_jax import methods, plotting

ALL = ("vanilla", "trb", "fixed_eps", "skd", "temperature", "sft_warmup", "veto")


def summary(workdir: str, warmup: int) -> dict:
    evals = common.read_jsonl(os.path.join(workdir, "eval.jsonl"))
    m = common.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    key = common.pass_key(evals[0])
    return {"pass@1": {e["step"]: e[key] for e in evals},
            "final_pass@1": evals[-1][key],
            "reward_last25": float(np.mean([r["reward"] for r in m[-25:]])),
            "teacher_logprob_warmup": float(np.mean([r["teacher_logprob"] for r in m[:warmup]]))}


def method_row(summaries: list[dict]) -> dict:
    """One method's row over its seeds' `summary` dicts: final periodic pass@1 mean and 95% t
    half-width, the mean periodic pass@1 at each evaluated update (those every seed has), and
    the mean teacher log-prob over the warmup."""
    finals = np.array([r["final_pass@1"] for r in summaries])
    updates = sorted(set.intersection(*(set(r["pass@1"]) for r in summaries)), key=int)
    return {"mean": float(finals.mean()), "ci95": float(plotting.ci95(finals[:, None])[0]),
            "n": len(summaries),
            "periodic_pass@1_by_update": {u: float(np.mean([r["pass@1"][u] for r in summaries]))
                                          for u in updates},
            "teacher_logprob_warmup": float(np.mean([r["teacher_logprob_warmup"]
                                                     for r in summaries]))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--methods", default=",".join(ALL))
    ap.add_argument("--reverse", action="store_true",
                    help="work from the last seed down (a second process shares the work)")
    args = ap.parse_args(argv)
    common.set_world(args.world)
    names = args.methods.split(",")
    seeds = list(range(args.seeds))
    if args.dry_run:
        return common.dry_run({
            "runs": [f"methods/{m}_seed{s}" for s in seeds for m in names],
            "results": common.results_path("methods_seeds.json"),
            "figure": common.img_path("methods_seeds.png"),
            "max_new_tokens": int(common.toy_config(names[0], 0).rollout.max_new_tokens),
            "student": str(common.toy_config(names[0], 0).model.student)})
    pending = []
    for seed in (seeds[::-1] if args.reverse else seeds):  # seed-major: every method early
        for method in names:
            if common.run(f"methods/{method}_seed{seed}", method, seed) is None:
                pending.append((method, seed))
    # runs another process was training: wait for them before summarising
    for method, seed in pending:
        total = methods.total_updates(common.toy_config(method, seed).method,
                                      common.toy_config(method, seed).train.num_steps)
        while not common.is_finished(os.path.join(common.DEFAULT_OUT, f"methods/{method}_seed{seed}"),
                                     total):
            time.sleep(10)
    runs = {m: [os.path.join(common.DEFAULT_OUT, f"methods/{m}_seed{s}") for s in seeds]
            for m in names}
    results = {f"{m}/seed{s}": summary(runs[m][s], common.toy_config(m, s).method.warmup_steps)
               for m in names for s in seeds}
    table = {method: method_row([results[f"{method}/seed{s}"] for s in seeds])
             for method in names}
    for method, row in table.items():
        curve = ", ".join(f"{k}: {v:.3f}" for k, v in row["periodic_pass@1_by_update"].items())
        print(f"{method:12s} final pass@1 {row['mean']:.3f} +- {row['ci95']:.3f} "
              f"(n={row['n']}); mean periodic pass@1 by update {{{curve}}}; "
              f"teacher log-prob over the warmup {row['teacher_logprob_warmup']:.3f}", flush=True)
    results["table"] = table
    common.write_json(common.results_path("methods_seeds.json"), results)
    key = common.pass_key(common.read_jsonl(os.path.join(runs[names[0]][0], "eval.jsonl"))[0])
    plotting.plot_curves(runs, [("reward", "metrics", "rollout reward"),
                                (key, "eval", "test pass@1"),
                                ("teacher_logprob", "metrics", "teacher log-prob")],
                         common.img_path("methods_seeds.png"), smooth=10,
                         title=f"toy world ({common.WORLD}): {', '.join(names)}; "
                               f"mean +- 95% CI over {args.seeds} seeds")


if __name__ == "__main__":
    main()
