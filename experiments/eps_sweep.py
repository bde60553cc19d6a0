"""eps_0 sweep on the toy world with the paper's Fig-7 warmup diagnostics.

    python experiments/eps_sweep.py [--eps 0.01,0.03,0.1,0.3,1] [--seeds 3] [--problems 512]
                                    [--world hard]

Part 1 (diagnostics, no training): the untrained student's rollouts on `--problems` train
prompts under the TRB behavior at each eps (eps = 0 is the student): mean teacher log-prob of
the sampled tokens, verifier reward, AUROC of the teacher-support score
mean(log pi_T - log pi_S) for correct vs incorrect rollouts, realised KL(mu || pi_S), beta*.
Part 2 (training): TRB runs with eps_0 = each value, `--seeds` seeds; final test pass@1.
Writes experiments/results/eps_sweep.json and docs/img/eps_sweep.png (results_hard/ and
docs/img/hard/ with --world hard).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import numpy as np

import common
from trb_jax import config as config_lib
from trb_jax import data as data_lib
from trb_jax import evaluation, methods, plotting, rewards, trainer
from trb_jax.behaviors import make_knobs
from trb_jax.rollout import rollout, row_keys


def diagnostics(eps_values, n_problems: int, seed: int) -> list[dict]:
    cfg = config_lib.to_run_config(common.toy_config("trb", seed), workdir="/tmp/unused")
    models = trainer.load_models(cfg.model)
    stream = data_lib.make_stream(cfg.data, models.tokenizer_s, models.tokenizer_t,
                                  batch_size=n_problems)
    examples = next(stream)
    prompts = data_lib.to_prompts(examples, models.pad_id_s, models.pad_id_t,
                                  (cfg.rollout.prompt_length,))
    answers = [e.answer for e in examples]
    keys = row_keys(jax.random.key(seed), np.arange(len(examples)))
    out = []
    with rewards.Grader(2) as grader:
        for eps in eps_values:
            behavior = "trb" if eps > 0 else "student"
            spec = trainer._rollout_spec(cfg, models, "trb")
            ro = rollout(models.params_s, models.params_t, prompts, keys, make_knobs(eps=eps),
                         student_config=models.config_s, teacher_config=models.config_t,
                         spec=spec)
            host = {k: np.asarray(getattr(ro, k)) for k in
                    ("tokens_bt", "lengths_b", "response_mask_bt", "teacher_logprob_bt",
                     "student_logprob_bt", "beta_bt", "kl_bt")}
            mask = host["response_mask_bt"].astype(bool)
            texts = evaluation.decode_responses(models.tokenizer_s, host["tokens_bt"],
                                                host["lengths_b"], models.eos.stop_id)
            reward = grader.grade_batch(texts, answers)
            t_row = (np.where(mask, host["teacher_logprob_bt"], 0).sum(-1) / mask.sum(-1))
            s_row = (np.where(mask, host["student_logprob_bt"], 0).sum(-1) / mask.sum(-1))
            out.append({"eps": eps, "behavior": behavior,
                        "teacher_logprob": float(host["teacher_logprob_bt"][mask].mean()),
                        "reward": float(np.mean(reward)),
                        "auroc": rewards.auroc(t_row - s_row, (reward > 0.5).astype(int)),
                        "behavior_kl": float(host["kl_bt"][mask].mean()),
                        "beta_mean": float(host["beta_bt"][mask].mean())})
            print(out[-1], flush=True)
    return out


def _wait(workdir: str) -> str:
    """A run another process is training (methods_seeds.py's trb runs): wait for it."""
    total = common.toy_config("trb", 0).train.num_steps
    while not common.is_finished(workdir, total):
        time.sleep(10)
    return workdir


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    common.add_world_arg(ap)
    ap.add_argument("--eps", default="0.01,0.03,0.1,0.3,1")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--problems", type=int, default=512)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args(argv)
    common.set_world(args.world)
    eps_values = [float(x) for x in args.eps.split(",")]
    path = common.results_path("eps_sweep.json")
    if args.dry_run:
        default = common.toy_config("trb", 0).method.eps0
        return common.dry_run({
            "diagnostics_eps": [0.0] + eps_values, "results": path,
            "figure": common.img_path("eps_sweep.png"),
            "runs": [] if args.skip_training else [
                f"methods/trb_seed{s}" if e == default else f"eps/eps{e}_seed{s}"
                for s in range(args.seeds) for e in eps_values]})
    results = {"diagnostics": diagnostics([0.0] + eps_values, args.problems, 0)}
    common.write_json(path, results)
    if not args.skip_training:
        results["training"] = {}
        for seed in range(args.seeds):
            for eps in eps_values:
                default = common.toy_config("trb", seed).method.eps0
                # the default eps_0 is the trb run of methods_seeds.py: the same run, reused
                name = (f"methods/trb_seed{seed}" if eps == default else f"eps/eps{eps}_seed{seed}")
                w = common.run(name, "trb", seed, None if eps == default else {"method.eps0": eps})
                w = w or _wait(os.path.join(common.DEFAULT_OUT, name))
                ev = common.read_jsonl(os.path.join(w, "eval.jsonl"))[-1]
                results["training"].setdefault(str(eps), []).append(ev[common.pass_key(ev)])
                common.write_json(path, results)
    _plot(results, common.img_path("eps_sweep.png"))


def _plot(results: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    diag = results["diagnostics"]
    eps = [max(d["eps"], 1e-3) for d in diag]
    panels = [("teacher_logprob", "teacher log-prob"), ("reward", "verifier reward"),
              ("auroc", "AUROC (teacher-support score)")]
    ncols = len(panels) + (1 if "training" in results else 0)
    fig, axes = plt.subplots(1, ncols, figsize=(4.2 * ncols, 3.4))
    for ax, (key, label) in zip(axes, panels):
        ax.plot(eps, [d[key] for d in diag], "o-")
        ax.set_xscale("log")
        ax.set_xlabel("eps (0 plotted at 1e-3)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if "training" in results:
        ax = axes[-1]
        xs = sorted(results["training"], key=float)
        vals = [np.array(results["training"][x]) for x in xs]
        means = [v.mean() for v in vals]
        half = [float(plotting.ci95(v[:, None])[0]) for v in vals]
        ax.errorbar([float(x) for x in xs], means, yerr=half, fmt="o-", capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("eps_0")
        ax.set_ylabel("final test pass@1 (TRB)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"toy world ({common.WORLD}): step-0 warmup diagnostics against eps (Fig. 7) and eps_0 sweep")
    fig.tight_layout()
    os.makedirs(os.path.dirname(png), exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
