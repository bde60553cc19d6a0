"""Tests for trb_jax.schedules: values, traced steps, and argument errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from trb_jax import schedules


def test_linear_anneal_matches_formula_and_reaches_zero():
    sched = schedules.linear_anneal_eps(0.05, 40)
    steps = np.arange(0, 61)
    got = np.array([float(sched(k)) for k in steps])
    want = 0.05 * np.clip(1.0 - steps / 40.0, 0.0, None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    assert float(sched(40)) == 0.0 and float(sched(1000)) == 0.0
    assert schedules.warmup_is_over(40, 40) and not schedules.warmup_is_over(39, 40)


def test_schedules_accept_traced_steps_without_retracing():
    sched = schedules.linear_anneal_eps(0.01, 10)
    traces = []

    @jax.jit
    def f(step):
        traces.append(1)
        return sched(step)

    vals = [float(f(jnp.int32(k))) for k in range(12)]
    assert len(traces) == 1
    np.testing.assert_allclose(vals[:11], 0.01 * (1 - np.arange(11) / 10), rtol=1e-6, atol=1e-9)


def test_constant_eps_and_temperature_warmup():
    np.testing.assert_allclose(float(schedules.constant_eps(0.02)(123)), 0.02, rtol=1e-7)
    tau = schedules.temperature_warmup(0.8, 20)
    np.testing.assert_allclose([float(tau(k)) for k in (0, 10, 20, 50)], [0.8, 0.9, 1.0, 1.0],
                               rtol=1e-6)


def test_make_eps_schedule_by_name():
    lin = schedules.make_eps_schedule("linear", eps0=0.1, warmup_steps=4)
    assert float(lin(2)) == pytest.approx(0.05)
    const = schedules.make_eps_schedule("constant", eps0=0.1)
    assert float(const(99)) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: schedules.linear_anneal_eps(-0.1, 10), "eps0 must be >= 0, got -0.1"),
        (lambda: schedules.linear_anneal_eps(0.1, 0), "warmup_steps must be a positive integer"),
        (lambda: schedules.constant_eps(-1.0), "eps must be >= 0"),
        (lambda: schedules.temperature_warmup(0.0, 5), "tau0 must be > 0"),
        (lambda: schedules.temperature_warmup(0.9, -3), "warmup_steps must be a positive integer"),
        (lambda: schedules.make_eps_schedule("cosine", eps0=0.1), "unknown eps schedule 'cosine'"),
        (lambda: schedules.make_eps_schedule("linear", eps0=0.1), "warmup_steps is required"),
    ],
)
def test_bad_arguments_name_the_field(build, message):
    with pytest.raises(ValueError, match=message):
        build()
