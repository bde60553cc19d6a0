"""The pre-registered verdicts (docs/results.md, "Hard world: pre-registered plan"), computed
from the experiment outputs by the rules written before any method ran.

    python experiments/verdicts.py [--world hard]

Reads final_eval.json (H1), methods_seeds.json (H2a), eps_sweep.json (H2b) and
prefix_probe.json (H3) from the world's results folder, applies the rules and writes
verdicts.json beside them. Prints one line per hypothesis, then (labelled exploratory, outside
the plan) the H1 rule applied to every other method's final pass@1 against vanilla.

Rules (copied from the plan; nothing here may be changed after the results are seen):
- H1, H2a: paired differences TRB - vanilla over seeds. win: the 95% t interval excludes 0 on
  the positive side and >= 4 of 5 differences are positive; loss: the mirror image; otherwise
  inconclusive.
- H2b: Spearman rho of AUROC against eps over the levels whose AUROC is defined. supported:
  rho <= -0.8 and AUROC(1) < AUROC(0); contradicted: rho >= +0.8; otherwise inconclusive.
- H3: relative gain (student continuer) per prefix length. supported: Spearman rho of gain
  against length >= 0.8 and gain(longest) > gain(shortest); contradicted: rho <= -0.8 or
  gain(longest) < 0; otherwise inconclusive (also when both rules fire: reported as such).
"""

from __future__ import annotations

import argparse
import json
import math
import os

import numpy as np
from scipy import stats

import common
from trb_jax import plotting

MIN_SAME_SIGN = 4  # of 5 paired seeds


def paired_rule(diffs_n: np.ndarray) -> dict:
    """win / loss / inconclusive of paired differences by the pre-registered rule."""
    mean, half = float(diffs_n.mean()), float(plotting.ci95(diffs_n[:, None])[0])
    pos, neg = int(np.sum(diffs_n > 0)), int(np.sum(diffs_n < 0))
    if mean - half > 0 and pos >= MIN_SAME_SIGN:
        verdict = "win"
    elif mean + half < 0 and neg >= MIN_SAME_SIGN:
        verdict = "loss"
    else:
        verdict = "inconclusive"
    return {"verdict": verdict, "mean": mean, "ci95_half": half, "low": mean - half,
            "high": mean + half, "positive": pos, "negative": neg,
            "diffs": [float(d) for d in diffs_n]}


def spearman(x, y) -> float:
    return float(stats.spearmanr(x, y).statistic)


def final_by_method(final: dict) -> dict[str, dict[int, float]]:
    """{method: {seed: final pass@1}} of the methods x seeds runs in final_eval.json."""
    by: dict[str, dict[int, float]] = {}
    for name, r in final.items():
        if name.startswith("methods/"):
            by.setdefault(r["group"], {})[r["seed"]] = r["pass@1"]
    return by


def paired_final(by: dict, method: str) -> dict:
    """The paired rule on `method` - vanilla final pass@1 over the seeds both have."""
    seeds = sorted(set(by.get(method, {})) & set(by.get("vanilla", {})))
    if not seeds:
        raise SystemExit(f"final_eval.json has no paired {method} and vanilla runs yet")
    out = paired_rule(np.array([by[method][s] - by["vanilla"][s] for s in seeds]))
    return {**out, "seeds": seeds, method: [by[method][s] for s in seeds],
            "vanilla": [by["vanilla"][s] for s in seeds]}


def h1(final: dict) -> dict:
    return paired_final(final_by_method(final), "trb")


def exploratory(final: dict) -> dict:
    """The H1 rule applied, for description only, to every other method against vanilla.

    Not part of the pre-registered plan (which names TRB alone); a method with fewer than
    two paired seeds has no interval and is left out."""
    by = final_by_method(final)
    return {f"{m} final pass@1, {m} - vanilla": paired_final(by, m)
            for m in sorted(by) if m not in ("vanilla", "trb")
            and len(set(by[m]) & set(by.get("vanilla", {}))) >= 2}


def h2a(runs: dict) -> dict:
    seeds = sorted(int(k.split("seed")[1]) for k in runs if k.startswith("trb/seed")
                   and f"vanilla/seed{k.split('seed')[1]}" in runs)
    key = "teacher_logprob_warmup"
    out = paired_rule(np.array([runs[f"trb/seed{s}"][key] - runs[f"vanilla/seed{s}"][key]
                                for s in seeds]))
    return {**out, "seeds": seeds}


def h2b(sweep: dict) -> dict:
    levels = [d for d in sweep["diagnostics"] if d["auroc"] is not None
              and not (isinstance(d["auroc"], float) and math.isnan(d["auroc"]))]
    eps = [d["eps"] for d in levels]
    auroc = {d["eps"]: d["auroc"] for d in levels}
    rho = spearman(eps, [auroc[e] for e in eps])
    supported = rho <= -0.8 and 1.0 in auroc and 0.0 in auroc and auroc[1.0] < auroc[0.0]
    contradicted = rho >= 0.8
    verdict = ("supported" if supported else "contradicted" if contradicted
               else "inconclusive")
    return {"verdict": verdict, "spearman": rho, "eps": eps, "auroc": [auroc[e] for e in eps]}


def h3(probe: dict) -> dict:
    lengths = sorted(int(t) for t in probe["lengths"])
    gain = [probe["lengths"][str(t)]["relative_gain/student"] for t in lengths]
    rho = spearman(lengths, gain)
    supported = rho >= 0.8 and gain[-1] > gain[0]
    contradicted = rho <= -0.8 or gain[-1] < 0
    verdict = ("both rules fire: inconclusive" if supported and contradicted else
               "supported" if supported else "contradicted" if contradicted else "inconclusive")
    return {"verdict": verdict, "spearman": rho, "lengths": lengths, "gain_student": gain,
            "gain_teacher": [probe["lengths"][str(t)]["relative_gain/teacher"] for t in lengths]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    args = ap.parse_args(argv)
    common.set_world(args.world)
    if args.dry_run:
        return common.dry_run({"results": common.results_path("verdicts.json")})

    def load(name):
        with open(common.results_path(name)) as f:
            return json.load(f)

    final = load("final_eval.json")
    out = {"H1 final pass@1, trb - vanilla": h1(final),
           "H2a warmup teacher log-prob, trb - vanilla": h2a(load("methods_seeds.json")),
           "H2b AUROC falls with eps": h2b(load("eps_sweep.json")),
           "H3 prefix gain grows with length": h3(load("prefix_probe.json"))}
    out["exploratory, outside the plan"] = exploratory(final)
    common.write_json(common.results_path("verdicts.json"), out)
    rows = [*((n, r) for n, r in out.items() if "verdict" in r),
            *((f"(exploratory) {n}", r) for n, r in out["exploratory, outside the plan"].items())]
    for name, r in rows:
        detail = (f"{r['mean']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}], "
                  f"{r['positive']}/{len(r['diffs'])} positive" if "mean" in r
                  else f"Spearman {r['spearman']:+.2f}")
        print(f"{name}: {r['verdict']} ({detail})")


if __name__ == "__main__":
    main()
