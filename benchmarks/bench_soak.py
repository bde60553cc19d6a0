"""Soak test of the training loop: many toy updates in one process, nothing may grow or recompile.

    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_soak.py                 # 500 updates
    JAX_PLATFORMS=cpu .venv/bin/python benchmarks/bench_soak.py --updates 20 --out runs/soak20.json

Runs `trainer.train` on the shipped toy world (configs/toy.py, method trb) with a small batch,
periodic evaluation and checkpoints, and checks three things over the run:

- memory: the process's resident set size (VmRSS from /proc/self/status) sampled after every
  update; growth = (RSS at the end - RSS after the warm-up) / RSS after the warm-up must stay
  below 5%. The warm-up ends after the first checkpoint and the first periodic evaluation, so
  their one-time allocations (Orbax threads, the evaluation program) are in the baseline. The
  slope of a least-squares line through the post-warm-up samples is reported too (a leak shows
  as a steady slope, noise does not);
- compilation: every XLA backend compile is counted (the jax.monitoring event
  /jax/core/compile/backend_compile_duration, with the compiled function's name), attributed to
  the update it happened in; after the first update there must be none. The TRB warmup is set
  longer than the run, so every update runs the same blend program with a new traced eps (an
  annealed run would switch once, legitimately, to the student-only program);
- metrics: metrics.jsonl holds one record per update, steps 0..N-1, the same keys in every
  record, and no missing (NaN/inf) value, except AUROC, which is undefined for a batch whose
  rewards are all equal (counted).

Writes a JSON with the machine, the command, the settings and the raw samples; exits non-zero if
a check fails. `run_soak` is what tests/test_bench_soak.py calls in a small mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import jax  # noqa: E402

from trb_jax import config as config_lib  # noqa: E402
from trb_jax import trainer  # noqa: E402
from trb_jax.metric_writer import read_jsonl  # noqa: E402

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
RSS_GROWTH_LIMIT = 0.05
# Undefined when every reward of a batch is equal (no correct or no incorrect rollout).
MAY_BE_MISSING = ("auroc",)


def rss_bytes() -> int:
    """Resident set size of this process (VmRSS), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def soak_config(updates: int, *, prompts_per_step: int, samples_per_prompt: int,
                max_new_tokens: int, eval_every: int, checkpoint_every: int,
                eval_problems: int):
    """configs/toy.py:method=trb sized for a long run in one process (eval_problems=0: no eval)."""
    cd = config_lib.load_config_file(config_lib.repo_config_path("toy"), "method=trb")
    cd.method.warmup_steps = 2 * updates  # the blend runs (eps annealing) for the whole soak
    cd.rollout.prompts_per_step = prompts_per_step
    cd.rollout.samples_per_prompt = samples_per_prompt
    cd.rollout.max_new_tokens = max_new_tokens
    cd.train.num_steps = updates
    cd.optim.decay_steps = updates
    cd.train.log_every = 1
    cd.train.eval_every = eval_every
    cd.train.checkpoint_every = checkpoint_every
    cd.train.max_checkpoints = 2
    cd.train.progress_bar = False
    if eval_problems:
        cd.eval.datasets.toy_test.max_examples = eval_problems
        cd.eval.batch_size = eval_problems * cd.eval.num_samples
        cd.eval.max_new_tokens = max_new_tokens
    else:  # no evaluation at all (the small mode of the test suite: one program less to compile)
        del cd.eval.datasets["toy_test"]
        cd.train.eval_every = 0
    return cd


class _Probe:
    """Per-update RSS and compile counts, by wrapping the trainer's update function."""

    def __init__(self):
        self.compiles: list[tuple[int, str]] = []  # (update it happened in or before, name)
        self.rss: list[int] = []  # after update k
        self.update_s: list[float] = []
        self._current = -1  # -1: before the first update (setup, the step-0 evaluation)

    def on_event(self, event: str, duration: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            self.compiles.append((self._current, str(kwargs.get("fun_name", "?"))))

    def wrap(self, one_update):
        def wrapped(run, k, pool):
            # compiles after an update (its evaluation, checkpoint) count against that update
            self._current = k
            t0 = time.perf_counter()
            out = one_update(run, k, pool)
            self.update_s.append(time.perf_counter() - t0)
            self.rss.append(rss_bytes())
            return out

        return wrapped


def _check_metrics(path: str, updates: int) -> dict:
    records = read_jsonl(path)
    steps = [r["step"] for r in records]
    keys = set(records[0]) if records else set()
    missing = {}
    for r in records:
        for key, value in r.items():
            if value is None:
                missing[key] = missing.get(key, 0) + 1
    bad_keys = sorted(k for k in missing if k not in MAY_BE_MISSING)
    return {
        "records": len(records),
        "steps_complete": steps == list(range(updates)),
        "same_keys": all(set(r) == keys for r in records),
        "missing_values": missing,
        "ok": (steps == list(range(updates)) and all(set(r) == keys for r in records)
               and not bad_keys),
    }


def run_soak(updates: int, *, workdir: str | None = None, prompts_per_step: int = 4,
             samples_per_prompt: int = 2, max_new_tokens: int = 48, eval_every: int = 100,
             checkpoint_every: int = 50, eval_problems: int = 16,
             warmup_updates: int | None = None) -> dict:
    """Runs the soak; returns the result dict (its "ok" says whether every check passed)."""
    if warmup_updates is None:
        warmup_updates = min(max(eval_every, checkpoint_every), updates // 2)
    if not 1 <= warmup_updates < updates:
        raise ValueError(f"warmup_updates must be in [1, updates), got {warmup_updates}")
    settings = dict(updates=updates, prompts_per_step=prompts_per_step,
                    samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                    eval_every=eval_every, checkpoint_every=checkpoint_every,
                    eval_problems=eval_problems, warmup_updates=warmup_updates)
    cd = soak_config(updates, prompts_per_step=prompts_per_step,
                     samples_per_prompt=samples_per_prompt, max_new_tokens=max_new_tokens,
                     eval_every=eval_every, checkpoint_every=checkpoint_every,
                     eval_problems=eval_problems)
    own_dir = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="trb_soak_")
    probe = _Probe()
    jax.monitoring.register_event_duration_secs_listener(probe.on_event)
    original = trainer._one_update
    trainer._one_update = probe.wrap(original)
    rss_start = rss_bytes()
    t0 = time.perf_counter()
    try:
        cfg = config_lib.to_run_config(cd, workdir=workdir)
        trainer.train(cfg, workdir)
        metrics = _check_metrics(os.path.join(workdir, "metrics.jsonl"), updates)
    finally:
        trainer._one_update = original
        jax.monitoring.unregister_event_duration_listener(probe.on_event)
        if own_dir:
            shutil.rmtree(workdir, ignore_errors=True)
    wall_s = time.perf_counter() - t0

    rss = np.asarray(probe.rss, np.float64)
    # rss[k] is sampled when update k returns, before that update's evaluation and checkpoint:
    # the baseline is the first sample after the warm-up's evaluation and checkpoint ran.
    base = rss[warmup_updates]
    tail = rss[warmup_updates:]
    slope = float(np.polyfit(np.arange(tail.size), tail, 1)[0]) if tail.size > 1 else 0.0
    growth = float(rss[-1] / base - 1.0)
    late = [(k, name) for k, name in probe.compiles if k >= 1]
    result = {
        "command": " ".join([os.path.relpath(sys.argv[0], ROOT) if sys.argv[0] else "?"]
                            + sys.argv[1:]),
        "machine": {"cores": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "jax": jax.__version__,
                    "backend": jax.default_backend()},
        "settings": settings,
        "wall_s": wall_s,
        "update_s": {"first": probe.update_s[0],
                     "median_after_first": float(np.median(probe.update_s[1:]))
                     if len(probe.update_s) > 1 else None},
        "rss": {"before_setup_mib": rss_start / 2**20, "after_warmup_mib": base / 2**20,
                "end_mib": rss[-1] / 2**20, "max_after_warmup_mib": tail.max() / 2**20,
                "growth_after_warmup": growth,
                "slope_after_warmup_kib_per_update": slope / 1024,
                "samples_mib": [round(x / 2**20, 2) for x in rss]},
        "compiles": {"total": len(probe.compiles),
                     "before_first_update": sum(k == -1 for k, _ in probe.compiles),
                     "in_first_update": sum(k == 0 for k, _ in probe.compiles),
                     "after_first_update": len(late), "late": late},
        "metrics": metrics,
    }
    result["ok"] = bool(growth < RSS_GROWTH_LIMIT and not late and metrics["ok"])
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--updates", type=int, default=500)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--samples-per-prompt", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--warmup-updates", type=int, default=None,
                        help="RSS baseline after this many updates (default: after the first "
                             "checkpoint and periodic evaluation)")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "soak.json"))
    args = parser.parse_args(argv)
    result = run_soak(args.updates, prompts_per_step=args.prompts_per_step,
                      samples_per_prompt=args.samples_per_prompt,
                      max_new_tokens=args.max_new_tokens, eval_every=args.eval_every,
                      checkpoint_every=args.checkpoint_every, warmup_updates=args.warmup_updates)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    r, c = result["rss"], result["compiles"]
    print(f"{args.updates} updates in {result['wall_s']:.0f} s "
          f"(median {result['update_s']['median_after_first']:.3f} s/update); "
          f"RSS {r['after_warmup_mib']:.0f} -> {r['end_mib']:.0f} MiB "
          f"({100 * r['growth_after_warmup']:+.2f}%, {r['slope_after_warmup_kib_per_update']:+.1f} "
          f"KiB/update); compiles {c['before_first_update']} + {c['in_first_update']} in update 0"
          f" + {c['after_first_update']} later; metrics ok: {result['metrics']['ok']}")
    print(f"wrote {args.out}; {'PASS' if result['ok'] else 'FAIL'}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
