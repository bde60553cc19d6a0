"""Tests for trb_jax.behaviors: truncation (top-p) acts on the behavior distribution, after the
blend, never on the solve's inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from references import numpy_reference as ref
from trb_jax import behaviors as B

P_S = np.array([0.5, 0.45, 0.04, 0.01])
P_T = np.array([0.04, 0.45, 0.5, 0.01])


def _step(name, eps, top_p, rows=1):
    s = jnp.log(jnp.asarray(np.tile(P_S, (rows, 1)), jnp.float32))
    t = jnp.log(jnp.asarray(np.tile(P_T, (rows, 1)), jnp.float32))
    knobs = B.make_knobs(eps=eps, top_p=top_p)
    keys = jax.random.split(jax.random.key(0), rows)
    behavior = B.BEHAVIORS[name]
    # what the rollout does: process both models' logits, then the behavior
    return behavior(B.process_logits(s, knobs), B.process_logits(t, knobs), keys, knobs)


@pytest.mark.parametrize("eps", [0.01, 0.1, 0.5])
def test_top_p_does_not_turn_trb_into_the_student(eps):
    # Truncating each model first (top-p 0.9: {0, 1} vs {2, 1}) leaves one shared token, so
    # KL(mu_beta || pi_S) >= -log pi_S'(1) = 0.75 for every beta > 0 and beta* = 0 for all
    # three budgets. The blend of the full distributions gives 0.096, 0.29, 0.65.
    want = ref.solve_beta64(np.log(P_S), np.log(P_T), eps)
    assert want > 0.09
    step = _step("trb", eps, top_p=0.9)
    assert float(step.beta_b[0]) == pytest.approx(want, abs=1e-4)
    # the token is drawn from the top-p nucleus of mu*, renormalised
    log_mu = np.asarray(ref.blend_log_probs64(np.log(P_S), np.log(P_T), want))
    order = np.argsort(-log_mu)
    before = np.cumsum(np.exp(log_mu[order])) - np.exp(log_mu[order])
    keep = np.zeros(4, bool)
    keep[order[before < 0.9]] = True
    got = np.exp(np.asarray(step.log_mu_bv[0], np.float64))
    np.testing.assert_array_equal(got > 0, keep)
    np.testing.assert_allclose(got[keep], np.exp(log_mu[keep]) / np.exp(log_mu[keep]).sum(),
                               atol=1e-4)
    # the recorded KL is that of the distribution actually sampled
    with np.errstate(divide="ignore"):
        want_kl = ref.kl64(np.log(got), np.log(P_S))
    assert float(step.kl_b[0]) == pytest.approx(want_kl, abs=1e-4)


def test_top_p_truncates_every_behavior_after_the_fact():
    for name in ("student", "teacher", "temperature", "skd"):
        step = _step(name, 0.0, top_p=0.5, rows=64)
        mu = np.exp(np.asarray(step.log_mu_bv, np.float64))
        np.testing.assert_allclose(mu.sum(-1), 1.0, atol=1e-5)
        tokens = np.asarray(step.token_b)
        assert np.all(mu[np.arange(64), tokens] > 0), name
    # student at top-p 0.5 keeps only its argmax; teacher likewise
    assert np.all(np.asarray(_step("student", 0.0, 0.5, rows=16).token_b) == 0)
    assert np.all(np.asarray(_step("teacher", 0.0, 0.5, rows=16).token_b) == 2)
    # top_p = 1 changes nothing
    full = _step("trb", 0.1, top_p=1.0)
    np.testing.assert_allclose(np.exp(np.asarray(full.log_mu_bv[0])).sum(), 1.0, atol=1e-6)
    assert np.all(np.asarray(full.log_mu_bv[0]) > -np.inf)


def test_teacher_prefix_is_the_teacher_before_the_prefix_and_the_student_after():
    rows = 64
    s = jnp.log(jnp.asarray(np.tile(P_S, (rows, 1)), jnp.float32))
    t = jnp.log(jnp.asarray(np.tile(P_T, (rows, 1)), jnp.float32))
    keys = jax.random.split(jax.random.key(0), rows)
    prefix_b = np.arange(rows) % 3  # per-row prefixes 0, 1, 2
    # jitted once (knobs and position are traced): eager dispatch would dominate the runtime
    steps = jax.jit(lambda name, *a, **kw: B.BEHAVIORS[name](*a, **kw), static_argnums=0)
    for top_p in (1.0, 0.9):
        knobs = B.make_knobs(top_p=top_p, prefix_tokens=prefix_b)
        student, teacher = steps("student", s, t, keys, knobs), steps("teacher", s, t, keys, knobs)
        for position in range(3):
            step = steps("teacher_prefix", s, t, keys, knobs, position=jnp.int32(position))
            from_t = position < prefix_b
            np.testing.assert_array_equal(step.from_teacher_b, from_t)
            np.testing.assert_array_equal(step.token_b,
                                          np.where(from_t, teacher.token_b, student.token_b))
            np.testing.assert_array_equal(
                step.log_mu_bv, np.where(from_t[:, None], teacher.log_mu_bv, student.log_mu_bv))
            np.testing.assert_allclose(step.kl_b, np.where(from_t, teacher.kl_b, student.kl_b),
                                       atol=1e-6)
            np.testing.assert_array_equal(step.beta_b, from_t.astype(np.float32))
            assert not np.asarray(step.replaced_b).any()


def test_make_knobs_prefix_tokens():
    assert B.make_knobs().prefix_tokens.dtype == jnp.int32
    assert int(B.make_knobs().prefix_tokens) == 0
    assert int(B.make_knobs(prefix_tokens=10**12).prefix_tokens) == np.iinfo(np.int32).max
    for bad in (-1, 1.5, [2, -3]):
        with pytest.raises(ValueError, match="prefix_tokens"):
            B.make_knobs(prefix_tokens=bad)
