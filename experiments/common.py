"""Shared helpers of the reproduction scripts: run one toy training job, collect its numbers.

Every script here runs many short jobs in ONE process, so the compiled rollout and train-step
programs are shared between runs (a fresh process per run would spend most of its time
compiling). Each run is an ordinary trb_jax.train workdir (metrics.jsonl, eval.jsonl,
checkpoints); a finished run is skipped when a script is re-run.

Toy world: every script takes `--world default|hard` (default: $TRB_TOY_WORLD, else
"default"). The hard world (configs/toy.py:world=hard) keeps its runs in runs/experiments_hard,
its results in experiments/results_hard and its figures in docs/img/hard; the default world's
locations are unchanged (runs/experiments, experiments/results, docs/img).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from trb_jax import config as config_lib  # noqa: E402
from trb_jax import methods, trainer  # noqa: E402
from trb_jax.metric_writer import read_jsonl  # noqa: E402

WORLDS = ("default", "hard")
WORLD = os.environ.get("TRB_TOY_WORLD", "default")


def out_dir(world: str) -> str:
    """Where a world's experiment runs live."""
    return os.path.join(ROOT, "runs", "experiments" + ("" if world == "default" else f"_{world}"))


DEFAULT_OUT = out_dir(WORLD)


def set_world(world: str) -> None:
    """Selects the toy world of every following call (configs, run folder, result paths)."""
    global WORLD, DEFAULT_OUT
    if world not in WORLDS:
        raise ValueError(f"unknown toy world {world!r}; known: {WORLDS}")
    WORLD, DEFAULT_OUT = world, out_dir(world)


def add_world_arg(parser) -> None:
    parser.add_argument("--world", default=WORLD, choices=WORLDS,
                        help="toy world (default: $TRB_TOY_WORLD or 'default')")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (world, runs, output paths) as JSON and stop")


def results_path(name: str) -> str:
    """experiments/results/NAME (default world) or experiments/results_hard/NAME."""
    folder = "results" if WORLD == "default" else f"results_{WORLD}"
    return os.path.join(ROOT, "experiments", folder, name)


def img_path(name: str) -> str:
    """docs/img/NAME (default world) or docs/img/hard/NAME."""
    return os.path.join(ROOT, "docs", "img", *(() if WORLD == "default" else (WORLD,)), name)


def dry_run(plan: dict[str, Any]) -> None:
    print(json.dumps({"world": WORLD, "out": DEFAULT_OUT, **plan}, indent=1), flush=True)


def toy_config(method: str, seed: int, overrides: dict[str, Any] | None = None):
    """configs/toy.py:method=...,seed=...[,world=hard] (the selected world) with dotted-path
    overrides {"optim.peak_lr": 1e-3}."""
    world = "" if WORLD == "default" else f",world={WORLD}"
    cd = config_lib.load_config_file(config_lib.repo_config_path("toy"),
                                     f"method={method},seed={seed}{world}")
    for path, value in (overrides or {}).items():
        node = cd
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    cd.train.progress_bar = False
    return cd


def run(name: str, method: str, seed: int, overrides: dict[str, Any] | None = None,
        out: str | None = None) -> str | None:
    """Trains (or skips, if finished) one toy run in OUT/NAME (OUT: the world's DEFAULT_OUT);
    returns its workdir, or None if another process is training it right now."""
    workdir = os.path.join(out or DEFAULT_OUT, name)
    cd = toy_config(method, seed, overrides)
    cfg = config_lib.to_run_config(cd, workdir=workdir)
    total = methods.total_updates(cfg.method, cfg.train.num_steps)
    if is_finished(workdir, total):
        return workdir
    # Several script processes may share the work (e.g. one per core): a run is claimed with
    # an exclusive claim file; a run claimed by another process is skipped here (None). (Not
    # WORKDIR/.lock: that is the trainer's own lock, trb_jax.locking, which reads it as JSON.)
    os.makedirs(workdir, exist_ok=True)
    lock = os.path.join(workdir, ".claim")  # not ".lock": that is the trainer's WorkdirLock
    fd = claim(lock)
    if fd is None:
        return None
    try:
        start = time.perf_counter()
        trainer.train(cfg, workdir)
        print(f"[{name}] {total} updates in {time.perf_counter() - start:.0f} s", flush=True)
    finally:
        os.close(fd)
        os.remove(lock)
    return workdir


def claim(path: str) -> int | None:
    """Creates the claim file PATH holding this pid and returns its descriptor, or None if a
    live process holds it. A claim left by a process that is gone (killed, or the machine's
    session ended) is taken over, so a killed script resumes its runs instead of waiting for
    them forever. (The scripts share one machine, so a pid is enough.)"""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _holder_alive(path):
                return None
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        os.write(fd, str(os.getpid()).encode())
        return fd
    return None


def _holder_alive(path: str) -> bool:
    try:
        with open(path) as f:
            text = f.read().strip()
        age_s = time.time() - os.path.getmtime(path)
    except FileNotFoundError:
        return False
    if not text.isdigit():  # empty: its creator may not have written its pid yet
        return not text and age_s < 60
    pid = int(text)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def is_finished(workdir: str, total: int) -> bool:
    done = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return bool(done) and done[-1]["step"] == total - 1 and os.path.exists(
        os.path.join(workdir, "checkpoints", str(total)))


def final_eval(workdir: str) -> dict[str, Any]:
    return read_jsonl(os.path.join(workdir, "eval.jsonl"))[-1]


def pass_key(record: dict[str, Any]) -> str:
    return next(k for k in record if k.endswith("/pass@1"))


def write_json(path: str, payload: Any) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)
