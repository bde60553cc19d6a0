"""Tests for trb_jax.blending against the float64 NumPy and PyTorch references."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from references import numpy_reference as ref
from references import torch_reference as tref
from trb_jax import blending
from trb_jax.blending import EosMap, trust_region_blend

QWEN3_VOCAB = 151_936

# ----------------------------------------------------------------------------------------------
# Row generators: every "kind" of pair the solver must survive, drawn from a seed so hypothesis
# shrinks over a handful of scalars instead of thousands of floats.
# ----------------------------------------------------------------------------------------------
KINDS = ("random", "masked", "disjoint", "identical", "near_identical", "large", "shifted")


def make_pair(kind: str, seed: int, vocab: int, rows: int, scale: float):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(rows, vocab)) * scale
    t = rng.normal(size=(rows, vocab)) * scale
    if kind == "masked":  # independent top-k/top-p style masks, partial overlap
        for arr in (s, t):
            keep = rng.random(size=arr.shape) < rng.uniform(0.2, 0.9)
            keep[np.arange(rows), rng.integers(0, vocab, rows)] = True
            arr[~keep] = -np.inf
    elif kind == "disjoint":
        split = rng.random(size=(rows, vocab)) < 0.5
        split[:, 0], split[:, -1] = True, False
        s[~split] = -np.inf
        t[split] = -np.inf
    elif kind == "identical":
        t = s.copy()
    elif kind == "near_identical":
        t = s + rng.normal(size=s.shape) * 1e-3 * scale
    elif kind == "large":  # logits far beyond exp's range; differences stay large too
        s = s * 1e3 + 1e4
        t = t * 1e3 - 1e4
    elif kind == "shifted":  # same distribution, huge constant offset
        t = s + 3e4
    return s.astype(np.float32), t.astype(np.float32)


eps_values = st.one_of(
    st.just(0.0),
    st.floats(min_value=-9, max_value=1).map(lambda e: float(10.0**e)),
)


def float32_rtol(s_row, t_row) -> float:
    """Relative tolerance on D that float32 can honour for this row: 1e-5, unless the log-ratio
    r = t - s is so large that beta * r itself rounds at 2^-24 |r| (logits ~1e4: D is then
    resolved to ~1e-3 relative; realistic LM logits, |r| < 100, stay at 1e-5)."""
    both = np.isfinite(s_row) & np.isfinite(t_row)
    r = (t_row[both].astype(np.float64) - s_row[both])
    spread = float(r.max() - r.min()) if r.size else 0.0
    return max(1e-5, 4 * 2.0**-24 * spread)


def assert_solution_properties(s32, t32, eps, res):
    """Constraint held, beta maximal, normalised, no NaN, log_probs = mu_beta: per row, in float64."""
    log_probs = np.asarray(res.log_probs, np.float64)
    beta = np.asarray(res.beta, np.float64)
    kl = np.asarray(res.kl, np.float64)
    assert not np.isnan(log_probs).any() and not np.isnan(beta).any() and not np.isnan(kl).any()
    eps_rows = np.broadcast_to(np.asarray(eps, np.float64), beta.shape)
    for i in range(beta.shape[0]):
        e, b = eps_rows[i], float(beta[i])
        assert 0.0 <= b <= 1.0
        rtol = float32_rtol(s32[i], t32[i])
        slack_hi = e * (1 + 1e-5) + 1e-9
        assert kl[i] <= slack_hi, (i, kl[i], e)
        slack_hi = e * (1 + rtol) + 1e-9
        d_ref = ref.blend_kl64(s32[i], t32[i], b)
        assert d_ref <= slack_hi, ("constraint", i, b, d_ref, e)
        if b < 1.0:  # maximal: a step of 1e-5 up leaves the trust region (same tolerance)
            d_up = ref.blend_kl64(s32[i], t32[i], min(b + 1e-5, 1.0))
            assert d_up > e * (1 - rtol) - 1e-9, ("maximal", i, b, d_up, e)
        np.testing.assert_allclose(np.logaddexp.reduce(log_probs[i]), 0.0, atol=1e-5)
        want = ref.blend_log_probs64(s32[i], t32[i], b)
        np.testing.assert_allclose(np.exp(log_probs[i]), np.exp(want), atol=2e-6, rtol=1e-4)


@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 8.0),
    eps=eps_values,
    solver=st.sampled_from(blending.SOLVERS),
)
def test_properties_small_vocab(kind, seed, scale, eps, solver):
    s, t = make_pair(kind, seed, vocab=24, rows=4, scale=scale)
    res = trust_region_blend(s, t, eps, solver=solver)
    assert_solution_properties(s, t, eps, res)


@given(
    kind=st.sampled_from(KINDS),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 6.0),
    eps=eps_values,
    solver=st.sampled_from(blending.SOLVERS),
)
def test_properties_qwen3_vocab(kind, seed, scale, eps, solver):
    s, t = make_pair(kind, seed, vocab=QWEN3_VOCAB, rows=1, scale=scale)
    res = trust_region_blend(s, t, eps, solver=solver)
    assert_solution_properties(s, t, eps, res)


@pytest.mark.parametrize("solver", blending.SOLVERS)
@pytest.mark.parametrize("kind", ("random", "masked"))
def test_constraint_holds_in_float64_at_qwen3_vocab_for_budgets_up_to_one(kind, solver):
    """The guarantee is about the true KL: at V = 151,936 the float64 D at the returned beta is
    within eps (1 + 1e-5) + 1e-9 for budgets up to 1 (a plain float32 reduce over V rounds at
    ~sqrt(V) 2^-24 ~ 2e-5 relative, enough to break this on some CPUs)."""
    eps = np.array([1e-3, 0.1, 0.5, 1.0], np.float32)
    for scale in (1.0, 4.0, 6.0):
        s, t = make_pair(kind, 0, vocab=QWEN3_VOCAB, rows=4, scale=scale)
        res = trust_region_blend(s, t, eps, solver=solver)
        for i in range(4):
            d64 = ref.blend_kl64(s[i], t[i], float(res.beta[i]))
            assert d64 <= float(eps[i]) * (1 + 1e-5) + 1e-9, (scale, i, float(res.beta[i]), d64)
            assert abs(float(res.kl[i]) - d64) <= 2e-6 * float(eps[i]) + 1e-9, (scale, i, d64)


def test_vocabulary_sums_are_precise_in_float32():
    rng = np.random.default_rng(0)
    x = rng.lognormal(size=(3, QWEN3_VOCAB))
    x = x.astype(np.float32)
    want = x.astype(np.float64).sum(-1)
    got = np.asarray(jax.jit(blending._sum_v)(jnp.asarray(x)), np.float64)
    # Tree of 64-wide blocks: worst case ~(64 x levels) 2^-24 relative; in practice far below.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Adversarial order: one large term then many terms below its rounding step. A running
    # float32 sum (what a reduce may compile to on some CPU) never moves off 1.0: 4.6e-3 lost.
    y = np.full((1, QWEN3_VOCAB), 3e-8, np.float32)
    y[0, 0] = 1.0
    exact = 1.0 + 3e-8 * (QWEN3_VOCAB - 1)
    running = np.add.accumulate(y[0], dtype=np.float32)[-1]
    assert abs(running - exact) / exact > 4e-3
    got_y = float(jax.jit(blending._sum_v)(jnp.asarray(y))[0])
    assert abs(got_y - exact) / exact < 64 * 2.0**-24
    kept = np.asarray(jax.jit(lambda v: blending._sum_v(v, keepdims=True))(jnp.asarray(x[:, :100])))
    np.testing.assert_allclose(kept[:, 0], x[:, :100].astype(np.float64).sum(-1), rtol=1e-6)


@given(
    kind=st.sampled_from(("random", "masked", "near_identical", "large")),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(0.05, 8.0),
    eps=eps_values,
)
def test_newton_and_bisection_agree(kind, seed, scale, eps):
    # Each solver returns a feasible beta within tol below beta*; tol = 5e-7 makes "within 1e-6
    # of each other" a consequence (with the default tol = 1e-6 they agree to 2e-6).
    s, t = make_pair(kind, seed, vocab=24, rows=4, scale=scale)
    # Where float32 cannot resolve D across a 1e-6 step (logits ~1e4 with D ~ 1e-8), any two
    # betas whose float64 D values agree within the constraint tolerance are equally right.
    bis = trust_region_blend(s, t, eps, solver="bisection", tol=5e-7)
    newt = trust_region_blend(s, t, eps, solver="newton", tol=5e-7)
    b_bis, b_newt = np.asarray(bis.beta, np.float64), np.asarray(newt.beta, np.float64)
    for i in np.flatnonzero(np.abs(b_newt - b_bis) > 1e-6):
        d_bis = ref.blend_kl64(s[i], t[i], b_bis[i])
        d_newt = ref.blend_kl64(s[i], t[i], b_newt[i])
        assert abs(d_newt - d_bis) <= 1e-5 * eps + 1e-9, (i, b_bis[i], b_newt[i], d_bis, d_newt)
    well_conditioned = kind != "large"
    if well_conditioned:
        np.testing.assert_allclose(b_newt, b_bis, atol=1e-6, rtol=0)


@pytest.mark.parametrize("solver", blending.SOLVERS)
def test_worked_example_from_spec(solver):
    """pi_S = [0.7, 0.3], pi_T = [0.2, 0.8] (docs/method.md, 'Worked example'), against the float64 solve."""
    s = np.log(np.array([[0.7, 0.3]] * 4, np.float32))
    t = np.log(np.array([[0.2, 0.8]] * 4, np.float32))
    eps = np.array([0.001, 0.01, 0.05, 0.1], np.float32)
    res = trust_region_blend(s, t, eps, solver=solver)
    want = [ref.solve_beta64(s[i], t[i], float(eps[i])) for i in range(4)]
    np.testing.assert_allclose(np.asarray(res.beta), want, atol=1e-6)
    # docs/method.md's printed values (5 decimals) are what the float64 solve gives.
    np.testing.assert_allclose(want, [0.04315, 0.13341, 0.29000, 0.40555], atol=5e-6)
    np.testing.assert_allclose(np.asarray(res.kl), eps, rtol=1e-4)
    for beta, mu, d in [(0.25, [0.5717, 0.4283], 0.0367), (0.5, [0.4330, 0.5670], 0.1529),
                        (0.7, [0.3282, 0.6718], 0.2930), (1.0, [0.2, 0.8], 0.5341)]:
        got_mu = np.exp(np.asarray(blending.blend_log_probs(s[0], t[0], beta)))
        np.testing.assert_allclose(got_mu, mu, atol=5e-5)
        assert float(blending.blend_kl(s[0], t[0], beta)) == pytest.approx(d, abs=5e-5)
    # KL(pi_T || pi_S) = 0.534111 is the budget at which beta* reaches 1.
    assert float(trust_region_blend(s[0], t[0], 0.5342, solver=solver).beta) == 1.0
    assert float(trust_region_blend(s[0], t[0], 0.5340, solver=solver).beta) < 1.0


@pytest.mark.parametrize("solver", blending.SOLVERS)
def test_exact_ends(solver):
    s, t = make_pair("random", 3, vocab=1000, rows=3, scale=2.0)
    zero = trust_region_blend(s, t, 0.0, solver=solver)
    np.testing.assert_array_equal(np.asarray(zero.beta), 0.0)
    np.testing.assert_array_equal(np.asarray(zero.kl), 0.0)
    np.testing.assert_array_equal(np.asarray(zero.log_probs),
                                  np.asarray(jax.nn.log_softmax(jnp.asarray(s), axis=-1)))
    kl_ts = np.array([ref.kl64(ref.log_softmax64(t[i]), ref.log_softmax64(s[i])) for i in range(3)])
    one = trust_region_blend(s, t, jnp.asarray(kl_ts * 1.001, jnp.float32), solver=solver)
    np.testing.assert_array_equal(np.asarray(one.beta), 1.0)
    np.testing.assert_array_equal(np.asarray(one.log_probs),
                                  np.asarray(jax.nn.log_softmax(jnp.asarray(t), axis=-1)))


def test_disjoint_supports_and_masked_teacher():
    s = np.array([[0.0, 1.0, -np.inf, -np.inf]], np.float32)
    t = np.array([[-np.inf, -np.inf, 2.0, 0.5]], np.float32)
    res = trust_region_blend(s, t, 10.0)  # no beta > 0 exists: mu_beta is undefined on (0, 1)
    assert float(res.beta[0]) == 0.0 and float(res.kl[0]) == 0.0
    # Teacher masks one student token: D(0+) = -log pi_S(I) is a floor on any beta > 0.
    t2 = np.array([[0.3, -np.inf, 1.0, 0.0]], np.float32)
    s2 = np.array([[0.0, 2.0, 0.5, 0.1]], np.float32)
    floor = ref.blend_kl_zero_plus64(s2[0], t2[0])
    assert float(trust_region_blend(s2, t2, floor * 0.99).beta[0]) == 0.0
    above = trust_region_blend(s2, t2, floor * 1.5)
    assert float(above.beta[0]) > 0.0
    assert np.exp(np.asarray(above.log_probs))[0, 1] == 0.0  # mu keeps off the teacher's mask


def test_leading_batch_dims_and_per_row_eps():
    s, t = make_pair("random", 7, vocab=50, rows=6, scale=1.5)
    s3, t3 = s.reshape(2, 3, 50), t.reshape(2, 3, 50)
    eps = np.array([[1e-3, 1e-2, 5e-2], [0.1, 0.0, 1e-4]], np.float32)
    res = trust_region_blend(s3, t3, eps)
    assert res.log_probs.shape == (2, 3, 50) and res.beta.shape == (2, 3) and res.kl.shape == (2, 3)
    want = [ref.solve_beta64(s[i], t[i], float(eps.reshape(-1)[i])) for i in range(6)]
    np.testing.assert_allclose(np.asarray(res.beta).reshape(-1), want, atol=1.5e-6)


@pytest.mark.parametrize("kind", ["random", "masked", "near_identical"])
def test_matches_independent_torch_implementation(kind):
    s, t = make_pair(kind, 11, vocab=300, rows=8, scale=2.0)
    eps = np.geomspace(1e-4, 0.5, 8).astype(np.float32)
    res = trust_region_blend(s, t, eps)
    log_mu, beta, kl = tref.torch_blend(torch.from_numpy(s).double(), torch.from_numpy(t).double(),
                                        torch.from_numpy(eps).double())
    np.testing.assert_allclose(np.asarray(res.beta), beta.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(res.kl), kl.numpy(), rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(np.exp(np.asarray(res.log_probs)), np.exp(log_mu.numpy()), atol=2e-6)


def test_bfloat16_inputs_compute_in_float32():
    s, t = make_pair("random", 5, vocab=2000, rows=4, scale=2.0)
    s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
    res16 = trust_region_blend(s16, t16, 0.02)
    res32 = trust_region_blend(s16.astype(jnp.float32), t16.astype(jnp.float32), 0.02)
    assert res16.log_probs.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(res16.beta), np.asarray(res32.beta))
    s_up = np.asarray(s16.astype(jnp.float32))
    t_up = np.asarray(t16.astype(jnp.float32))
    want = [ref.solve_beta64(s_up[i], t_up[i], 0.02) for i in range(4)]
    np.testing.assert_allclose(np.asarray(res16.beta), want, atol=1.5e-6)


@pytest.mark.parametrize("solver", blending.SOLVERS)
def test_new_eps_values_do_not_retrace(solver):
    s, t = make_pair("random", 1, vocab=64, rows=2, scale=1.0)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(s, t, eps):
        return trust_region_blend(s, t, eps, solver=solver).beta

    for eps in (0.0, 1e-3, 0.02, 0.3, 5.0):
        step(s, t, jnp.float32(eps))
    # The public (non-jitted) entry point also compiles once for a shape and many eps values.
    before = blending._blend_jit._cache_size()
    for eps in (1e-3, 0.02, 0.3):
        trust_region_blend(s, t, eps, solver=solver)
    assert blending._blend_jit._cache_size() - before <= 1


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, t: trust_region_blend(s, t[:, :-1], 0.1),
         r"same shape, got \(2, 8\) and \(2, 7\)"),
        (lambda s, t: trust_region_blend(s, t, -0.1), "eps must be >= 0 and not NaN"),
        (lambda s, t: trust_region_blend(s, t, np.zeros(3)), r"eps must be a scalar or have the batch shape \(2,\)"),
        (lambda s, t: trust_region_blend(s, t, 0.1, solver="brent"), "solver must be one of"),
        (lambda s, t: trust_region_blend(s, t, 0.1, tol=0.0), "tol must be > 0"),
    ],
)
def test_bad_input_errors(call, message):
    s, t = make_pair("random", 0, vocab=8, rows=2, scale=1.0)
    with pytest.raises(ValueError, match=message):
        call(s, t)


# ----------------------------------------------------------------------------------------------
# EOS canonicalisation
# ----------------------------------------------------------------------------------------------


def test_merge_eos_conserves_mass_and_matches_reference():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 40)).astype(np.float32) * 3
    eos = EosMap.from_ids(student_eos=[37], teacher_eos=[39, 38])
    assert eos.stop_id == 37 and eos.eos_ids == (37, 38, 39)
    merged = np.asarray(blending.merge_eos(jnp.asarray(logits), eos))
    for i in range(3):
        np.testing.assert_allclose(merged[i], ref.merge_eos64(logits[i], eos.eos_ids, eos.stop_id),
                                   rtol=1e-6)
    p_before = np.asarray(jax.nn.softmax(jnp.asarray(logits)))
    p_after = np.asarray(jax.nn.softmax(jnp.asarray(merged)))
    np.testing.assert_allclose(p_after[:, 37], p_before[:, 37:40].sum(-1), rtol=1e-5)
    assert np.all(p_after[:, 38:40] == 0.0)
    np.testing.assert_allclose(p_after[:, :37], p_before[:, :37], rtol=1e-5)


def test_eos_canonicalised_blend_compares_one_stop_event():
    """Student stops on id 4 (<|endoftext|>), teacher on id 5 (<|im_end|>): after merging, a
    teacher that wants to stop pulls the student's stop event, not an unrelated token."""
    s = np.log(np.array([[0.3, 0.2, 0.2, 0.1, 0.15, 0.05]], np.float32))
    t = np.log(np.array([[0.1, 0.1, 0.1, 0.05, 0.05, 0.6]], np.float32))
    eos = EosMap.from_ids([4], [5])
    s_m, t_m = blending.merge_eos(jnp.asarray(s), eos), blending.merge_eos(jnp.asarray(t), eos)
    res = trust_region_blend(s_m, t_m, 0.05)
    mu = np.exp(np.asarray(res.log_probs))[0]
    assert mu[5] == 0.0 and mu[4] > 0.2  # stop mass grew from 0.2 towards the teacher's 0.65
    tokens = jnp.array([4, 1, 4])
    np.testing.assert_array_equal(np.asarray(blending.stop_to_native(tokens, eos, 5)), [5, 1, 5])


def test_eos_errors():
    with pytest.raises(ValueError, match=r"EOS ids \[50\] are outside the vocabulary of size 40"):
        blending.merge_eos(jnp.zeros((2, 40)), EosMap.from_ids([50], [3]))
    with pytest.raises(ValueError, match="at least one EOS id"):
        EosMap.from_ids([], [])
