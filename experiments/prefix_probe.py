"""Step-0 prefix probe (docs/method.md §6): are TRB's prefixes better than the student's own?

    python experiments/prefix_probe.py [--problems 256] [--eps0 0.1] [--lengths 4,8,16,24]
                                       [--world hard]

With the untrained toy student: sample one response per test problem from TRB (eps_0, the
behavior of warmup step 0) and one from the pure student (vanilla OPD). Truncate each at t
response tokens, continue it to the end (n samples) with the student and with the teacher, and
grade prefix + continuation. Relative gain = success(TRB prefixes) / success(vanilla prefixes) - 1,
per length and continuer; the figure is docs/img/prefix_probe.png (docs/img/hard/ with
--world hard; `--plot-only` redraws it from the results file). A response that stopped before t is kept whole (the continuation is
empty and its grade is the original's). Writes experiments/results/prefix_probe.json
(experiments/results_hard/ with --world hard, whose responses are ~6x longer: try
--lengths 8,20,40,60,80,120).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import numpy as np

import common
from trb_jax import config as config_lib
from trb_jax import data as data_lib
from trb_jax import evaluation, rewards, trainer
from trb_jax.behaviors import make_knobs
from trb_jax.rollout import Prompts, pad_prompts, rollout, row_keys


def _decode(models, tokens_bt, lengths_b):
    return evaluation.decode_responses(models.tokenizer_s, tokens_bt, lengths_b,
                                       models.eos.stop_id)


def _sample(models, cfg, behavior, s_ids, t_ids, key, eps, max_new):
    spec = trainer._rollout_spec(cfg, models, behavior)
    spec = type(spec)(**{**spec.__dict__, "max_new_tokens": max_new})
    width = max(max(len(x) for x in s_ids), max(len(x) for x in t_ids))
    buckets = (max(64, 1 << (width - 1).bit_length()),)
    s, sm = pad_prompts(s_ids, pad_id=models.pad_id_s, buckets=buckets)
    t, tm = pad_prompts(t_ids, pad_id=models.pad_id_t, buckets=buckets)
    ro = rollout(models.params_s, models.params_t, Prompts(s, sm, t, tm),
                 row_keys(key, np.arange(len(s_ids))), make_knobs(eps=eps),
                 student_config=models.config_s, teacher_config=models.config_t, spec=spec)
    return np.asarray(ro.student_tokens_bt), np.asarray(ro.tokens_bt), np.asarray(ro.lengths_b)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--eps0", type=float, default=None, help="default: configs/toy.py's")
    ap.add_argument("--lengths", default="4,8,12,16,24")
    ap.add_argument("--continuations", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot-only", action="store_true",
                    help="redraw the figure from the results file and stop")
    args = ap.parse_args(argv)
    common.set_world(args.world)
    if args.plot_only:
        with open(common.results_path("prefix_probe.json")) as f:
            return plot(json.load(f), common.img_path("prefix_probe.png"))
    if args.dry_run:
        return common.dry_run({"results": common.results_path("prefix_probe.json"),
                               "figure": common.img_path("prefix_probe.png"),
                               "lengths": [int(x) for x in args.lengths.split(",")],
                               "max_new_tokens": int(common.toy_config("trb", args.seed)
                                                     .rollout.max_new_tokens)})
    cd = common.toy_config("trb", args.seed)
    cfg = config_lib.to_run_config(cd, workdir="/tmp/unused")
    eps0 = cfg.method.eps0 if args.eps0 is None else args.eps0
    models = trainer.load_models(cfg.model)
    ds = cfg.eval.datasets[0]
    problems, answers = evaluation.load_eval_problems(ds.__class__(**{**ds.__dict__,
                                                                      "max_examples": args.problems}))
    sp = cfg.data.system_prompt
    s_prompt = [data_lib.encode_student(p, models.tokenizer_s, sp) for p in problems]
    t_prompt = [data_lib.encode_teacher(p, models.tokenizer_t, sp) for p in problems]
    T = cfg.rollout.max_new_tokens
    key = jax.random.key(args.seed)
    lengths = [int(x) for x in args.lengths.split(",")]
    n = args.continuations
    out = {"eps0": eps0, "problems": len(problems), "continuations": n, "lengths": {}}
    with rewards.Grader(2) as grader:
        prefixes = {}
        for name, behavior, eps in (("trb", "trb", eps0), ("vanilla", "student", 0.0)):
            toks, canon, lens = _sample(models, cfg, behavior, s_prompt, t_prompt,
                                        jax.random.fold_in(key, 0), eps, T)
            full = grader.grade_batch(_decode(models, canon, lens), answers)
            prefixes[name] = (toks, canon, lens)
            out[f"{name}_full_response_pass"] = float(np.mean(full))
        for t in lengths:
            row = {}
            for name, (toks, canon, lens) in prefixes.items():
                cut = np.minimum(lens, t)
                for who, behavior in (("student", "student"), ("teacher", "teacher")):
                    s_ids, t_ids, golds, heads = [], [], [], []
                    for i in range(len(problems)):
                        # the prefix as each model saw it (the stop, if inside, ends the text)
                        pre = [int(x) for x in toks[i, :cut[i]]]
                        for _ in range(n):
                            s_ids.append(s_prompt[i] + pre)
                            t_ids.append(t_prompt[i] + pre)
                            golds.append(answers[i])
                            heads.append(_decode(models, canon[i:i + 1, :cut[i]],
                                                 cut[i:i + 1])[0])
                    ctoks, ccanon, clens = _sample(models, cfg, behavior, s_ids, t_ids,
                                                   jax.random.fold_in(key, 1 + t), 0.0, T)
                    stopped = np.repeat(lens <= t, n)  # nothing to continue after a stop
                    tails = _decode(models, ccanon, np.where(stopped, 0, clens))
                    scores = grader.grade_batch([h + c for h, c in zip(heads, tails)], golds)
                    row[f"{name}/{who}"] = float(np.mean(scores))
            for who in ("student", "teacher"):
                v, r = row[f"vanilla/{who}"], row[f"trb/{who}"]
                row[f"relative_gain/{who}"] = (r / v - 1.0) if v > 0 else float("nan")
            out["lengths"][t] = row
            print(t, row, flush=True)
    common.write_json(common.results_path("prefix_probe.json"), out)
    # plot() reads the file's form (length keys as strings): draw from the round trip
    plot(json.loads(json.dumps(out)), common.img_path("prefix_probe.png"))


def plot(results: dict, png: str) -> None:
    """Success rate of the continuations and the relative gain against the prefix length, for
    both continuers (results as written to prefix_probe.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = sorted(int(t) for t in results["lengths"])
    rows = [results["lengths"][str(t)] for t in lengths]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
    for who, marker in (("student", "o"), ("teacher", "s")):
        for name, style in (("trb", "-"), ("vanilla", "--")):
            axes[0].plot(lengths, [r[f"{name}/{who}"] for r in rows], marker=marker,
                         linestyle=style, label=f"{name} prefix -> {who}")
        axes[1].plot(lengths, [r[f"relative_gain/{who}"] for r in rows], marker=marker,
                     label=f"{who} continues")
    axes[0].set_ylabel("success of prefix + continuation")
    axes[1].set_ylabel("relative gain of TRB prefixes")
    axes[1].axhline(0.0, color="grey", linewidth=0.8)
    for ax in axes:
        ax.set_xlabel("prefix length (response tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"step-0 prefix probe: eps_0 = {results['eps0']}, {results['problems']} problems "
                 f"x {results['continuations']} continuations", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"plot: {png}")


if __name__ == "__main__":
    main()
