"""benchmarks/bench_soak.py in a small mode: the checks it makes hold, and its counters count."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_soak  # noqa: E402


def test_the_compile_probe_counts_a_recompile_in_a_later_update():
    probe = bench_soak._Probe()
    f = jax.jit(lambda x: x * 2 + 1)
    step = probe.wrap(lambda run, k, pool: f(jnp.zeros(run[k])).block_until_ready())
    jax.monitoring.register_event_duration_secs_listener(probe.on_event)
    try:
        for k in range(3):
            step((7, 7, 5), k, None)  # update 2 has a new shape
    finally:
        jax.monitoring.unregister_event_duration_listener(probe.on_event)
    assert {k for k, _ in probe.compiles} == {0, 2}  # first calls (jit, jnp.zeros), new shape
    assert len(probe.rss) == 3 and min(probe.rss) > 0


@pytest.mark.slow
def test_small_soak_has_no_recompile_no_growth_and_complete_metrics(tmp_path):
    n = 4
    res = bench_soak.run_soak(n, workdir=str(tmp_path), prompts_per_step=1, samples_per_prompt=2,
                              max_new_tokens=16, eval_every=2, checkpoint_every=2,
                              eval_problems=0, warmup_updates=2)
    assert res["compiles"]["in_first_update"] > 0  # the counter sees the first compiles
    assert res["compiles"]["late"] == []
    assert res["metrics"]["records"] == n and res["metrics"]["steps_complete"]
    assert res["metrics"]["ok"]
    assert len(res["rss"]["samples_mib"]) == n
    assert res["rss"]["growth_after_warmup"] < bench_soak.RSS_GROWTH_LIMIT
    assert res["ok"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2", "4"]
