"""The README's main job: vanilla OPD vs TRB on the toy math world, on CPU, in minutes.

    python -m trb_jax.toy.demo [--out runs/toy_demo] [--seed 0] [--steps N] [--world hard]

Loads the shipped toy teacher and Base student (trb_jax/toy/assets; rebuilt by
`python -m trb_jax.toy.build` if missing), trains the student with vanilla OPD and with TRB from
the same seed and budget (configs/toy.py), evaluates pass@1 on the toy test split along the
way, prints a table and writes OUT/toy_demo.png (reward and pass@1 against update).
Re-running resumes (or skips) finished runs: each run is an ordinary trb_jax.train workdir.
`--world hard` runs the same comparison on the hard world (configs/toy.py:world=hard; about
9 min per run on a 2-core CPU, so about 18 min in all; default OUT runs/toy_demo_hard).
"""

from __future__ import annotations

import argparse
import os
import time

from trb_jax import config as config_lib
from trb_jax import plotting, trainer
from trb_jax.errors import cli_main
from trb_jax.metric_writer import read_jsonl

METHODS = ("vanilla", "trb")


def run_method(method: str, out: str, seed: int, steps: int | None,
               world: str = "default") -> str:
    cd = config_lib.load_config_file(config_lib.repo_config_path("toy"),
                                     f"method={method},seed={seed},world={world}")
    if steps is not None:
        cd.train.num_steps = steps
        cd.optim.decay_steps = steps
    workdir = os.path.join(out, f"{method}_seed{seed}")
    cfg = config_lib.to_run_config(cd, workdir=workdir)
    trainer.train(cfg, workdir)
    return workdir


def table(workdirs: dict[str, str]) -> str:
    rows = ["| method | pass@1 start | pass@1 end | mean reward (first 10) | mean reward (last 10) "
            "| teacher log-prob (first 10) |", "|---|---|---|---|---|---|"]
    for method, w in workdirs.items():
        ev = [r for r in read_jsonl(os.path.join(w, "eval.jsonl"))]
        m = read_jsonl(os.path.join(w, "metrics.jsonl"))
        key = next(k for k in ev[0] if k.endswith("/pass@1"))
        first, last = m[:10], m[-10:]
        mean = lambda rs, k: sum(r[k] for r in rs) / len(rs)  # noqa: E731
        rows.append(f"| {method} | {ev[0][key]:.3f} | {ev[-1][key]:.3f} | "
                    f"{mean(first, 'reward'):.3f} | {mean(last, 'reward'):.3f} | "
                    f"{mean(first, 'teacher_logprob'):.3f} |")
    return "\n".join(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="default: runs/toy_demo (runs/toy_demo_hard "
                        "with --world hard)")
    parser.add_argument("--world", default="default", choices=("default", "hard"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None, help="updates per run (default: "
                        "configs/toy.py's)")
    args = parser.parse_args(argv)
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    out = args.out or ("runs/toy_demo" if args.world == "default" else f"runs/toy_demo_{args.world}")
    start = time.perf_counter()
    workdirs = {m: run_method(m, out, args.seed, args.steps, args.world) for m in METHODS}
    print(table(workdirs))
    key = next(k for k in read_jsonl(os.path.join(workdirs["trb"], "eval.jsonl"))[0]
               if k.endswith("/pass@1"))
    png = plotting.plot_curves(
        {m: [w] for m, w in workdirs.items()},
        [("reward", "metrics", "rollout reward"), (key, "eval", "test pass@1"),
         ("teacher_logprob", "metrics", "teacher log-prob of sampled tokens")],
        os.path.join(out, "toy_demo.png"), smooth=5,
        title=f"toy world ({args.world}), seed {args.seed}: vanilla OPD vs TRB")
    print(f"plot: {png}")
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    cli_main(main)()
