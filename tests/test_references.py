"""Self-tests of the float64 NumPy and PyTorch references (tests/references/)."""

import math

import numpy as np
import pytest
import torch

from references import numpy_reference as nr
from references import torch_reference as tr

NEG_INF = -np.inf
S_EX = np.log([0.7, 0.3])
T_EX = np.log([0.2, 0.8])


def _random_rows(seed, n=24, vocab=9, mask_prob=0.3):
    """Random logits with -inf masks, plus hand-made support patterns; every row has support."""
    rng = np.random.default_rng(seed)
    s = rng.normal(scale=2.0, size=(n, vocab))
    t = rng.normal(scale=2.0, size=(n, vocab))
    for x in (s, t):
        m = rng.random(x.shape) < mask_prob
        m[np.arange(n), rng.integers(0, vocab, size=n)] = False  # keep >= 1 finite entry
        x[m] = NEG_INF
    # row 0: disjoint supports
    s[0] = NEG_INF; t[0] = NEG_INF
    s[0, :3] = rng.normal(size=3); t[0, 5:] = rng.normal(size=vocab - 5)
    # row 1: student support strictly inside teacher support
    s[1] = rng.normal(size=vocab); t[1] = rng.normal(size=vocab); s[1, :4] = NEG_INF
    # row 2: teacher support strictly inside student support
    s[2] = rng.normal(size=vocab); t[2] = rng.normal(size=vocab); t[2, 2:6] = NEG_INF
    # row 3: identical policies up to a shift
    s[3] = rng.normal(size=vocab); t[3] = s[3] + 3.0
    # row 4: no masks
    s[4] = rng.normal(size=vocab); t[4] = rng.normal(size=vocab)
    return s, t


# ------------------------------------------------------------------------------------------
# the worked example of docs/method.md
# ------------------------------------------------------------------------------------------
def test_worked_example_kl():
    assert abs(nr.forward_kl_full64(S_EX, T_EX) - 0.534111) < 5e-7
    assert abs(nr.blend_kl64(S_EX, T_EX, 1.0) - 0.534111) < 5e-7
    r = nr.log_softmax64(T_EX) - nr.log_softmax64(S_EX)
    np.testing.assert_allclose(r, [-1.2528, 0.9808], atol=5e-5)
    p = np.array([0.7, 0.3])
    var = p @ r**2 - (p @ r) ** 2
    assert abs(var - 1.04768) < 5e-6


@pytest.mark.parametrize(
    "beta, mu, d",
    [
        (0.25, [0.5717, 0.4283], 0.0367),
        (0.40, [0.4885, 0.5115], 0.0972),
        (0.50, [0.4330, 0.5670], 0.1529),
        (0.70, [0.3282, 0.6718], 0.2930),
        (1.00, [0.2000, 0.8000], 0.5341),
    ],
)
def test_worked_example_table(beta, mu, d):
    log_mu = nr.blend_log_probs64(S_EX, T_EX, beta)
    np.testing.assert_allclose(np.exp(log_mu), mu, atol=5e-5)
    assert abs(nr.blend_kl64(S_EX, T_EX, beta) - d) < 5e-5
    tl = tr.torch_blend_log_probs(S_EX, T_EX, beta)
    np.testing.assert_allclose(tl.numpy(), log_mu, rtol=0, atol=1e-12)
    assert abs(tr.torch_blend_kl(S_EX, T_EX, beta).item() - nr.blend_kl64(S_EX, T_EX, beta)) < 1e-12


@pytest.mark.parametrize("eps, beta", [(0.001, 0.04315), (0.01, 0.13341), (0.05, 0.29000), (0.1, 0.40555)])
def test_worked_example_beta_star(eps, beta):
    b = nr.solve_beta64(S_EX, T_EX, eps)
    assert abs(b - beta) < 5e-6
    assert nr.blend_kl64(S_EX, T_EX, b) <= eps
    assert nr.blend_kl64(S_EX, T_EX, min(1.0, b + 1e-12)) > eps - 1e-12
    _, tb, tkl = tr.torch_blend(S_EX, T_EX, eps)
    assert abs(tb.item() - b) < 1e-12
    assert tkl.item() <= eps and abs(tkl.item() - eps) < 1e-9


def test_worked_example_batched_torch_eps():
    eps = np.array([0.001, 0.01, 0.05, 0.1])
    s = np.tile(S_EX, (4, 1)); t = np.tile(T_EX, (4, 1))
    _, beta, _ = tr.torch_blend(s, t, eps)
    np.testing.assert_allclose(beta.numpy(), [0.04315, 0.13341, 0.29000, 0.40555], atol=5e-6)


# ------------------------------------------------------------------------------------------
# blending conventions and edge cases
# ------------------------------------------------------------------------------------------
def test_log_softmax_masks_and_invalid_row():
    x = np.array([0.0, NEG_INF, 1.0])
    ls = nr.log_softmax64(x)
    assert ls[1] == NEG_INF and np.isclose(np.exp(ls).sum(), 1.0)
    with pytest.raises(ValueError):
        nr.log_softmax64(np.full(3, NEG_INF))


def test_blend_end_conventions_exact_with_masks():
    s = np.array([0.3, NEG_INF, 1.0, -0.5])
    t = np.array([NEG_INF, 2.0, 0.1, 0.4])
    assert np.array_equal(nr.blend_log_probs64(s, t, 0.0), nr.log_softmax64(s))
    assert np.array_equal(nr.blend_log_probs64(s, t, 1.0), nr.log_softmax64(t))
    mid = nr.blend_log_probs64(s, t, 0.5)
    assert not np.any(np.isnan(mid))
    assert mid[0] == NEG_INF and mid[1] == NEG_INF and np.isclose(np.exp(mid).sum(), 1.0)
    for b in (0.0, 0.5, 1.0):
        tl = tr.torch_blend_log_probs(s, t, b).numpy()
        assert not np.any(np.isnan(tl))
        np.testing.assert_allclose(tl, nr.blend_log_probs64(s, t, b), atol=1e-12)
    # D jumps at 0+ to -log pi_S(I) and D(1) = inf (teacher puts mass where the student has none)
    d0p = nr.blend_kl_zero_plus64(s, t)
    ps = np.exp(nr.log_softmax64(s))
    assert np.isclose(d0p, -np.log(ps[2] + ps[3]))
    assert np.isclose(nr.blend_kl64(s, t, 1e-9), d0p, atol=1e-6)
    assert nr.blend_kl64(s, t, 0.0) == 0.0
    assert nr.blend_kl64(s, t, 1.0) == math.inf


def test_disjoint_supports():
    s = np.array([0.0, 1.0, NEG_INF, NEG_INF])
    t = np.array([NEG_INF, NEG_INF, 0.5, 0.0])
    assert nr.blend_log_probs64(s, t, 0.5) is None
    assert nr.blend_kl64(s, t, 0.5) == math.inf
    assert nr.blend_kl_zero_plus64(s, t) == math.inf
    for eps in (0.0, 1e-3, 0.5, 10.0, 1e6):
        assert nr.solve_beta64(s, t, eps) == 0.0
    log_mu, beta, kl = tr.torch_blend(np.stack([s, s]), np.stack([t, t]), np.array([1e-3, 1e6]))
    assert torch.all(beta == 0) and torch.all(kl == 0)
    assert not torch.any(torch.isnan(log_mu))
    np.testing.assert_allclose(log_mu[0].numpy(), nr.log_softmax64(s), rtol=0, atol=1e-15)
    # only an infinite budget reaches the teacher
    assert nr.solve_beta64(s, t, math.inf) == 1.0
    assert tr.torch_blend(s, t, math.inf)[1].item() == 1.0


def test_identical_policies_beta_one():
    rng = np.random.default_rng(1)
    s = rng.normal(size=7)
    s[2] = NEG_INF
    # exactly equal logits: beta* = 1 even for eps = 0; shifted logits equal the same policy only up
    # to rounding (D(1) ~ 1e-16, either sign), so there a tiny positive budget is used
    for t, budgets in ((s.copy(), (0.0, 1e-6, 0.1)), (s + 5.0, (1e-12, 1e-6, 0.1))):
        for eps in budgets:
            assert nr.solve_beta64(s, t, eps) == 1.0
            log_mu, beta, kl = tr.torch_blend(s, t, eps)
            assert beta.item() == 1.0 and abs(kl.item()) < 1e-12
            np.testing.assert_allclose(log_mu.numpy(), nr.log_softmax64(t), atol=1e-12)


def test_eps_zero_gives_student():
    s = np.array([0.0, 1.0, 2.0]); t = np.array([2.0, 1.0, 0.0])
    assert nr.solve_beta64(s, t, 0.0) == 0.0
    log_mu, beta, kl = tr.torch_blend(s, t, 0.0)
    assert beta.item() == 0.0 and kl.item() == 0.0
    np.testing.assert_allclose(log_mu.numpy(), nr.log_softmax64(s), rtol=0, atol=1e-15)


def test_blend_kl_monotone_random():
    s, t = _random_rows(2, n=16)
    grid = np.linspace(0.0, 1.0, 41)
    for i in range(s.shape[0]):
        d = np.array([nr.blend_kl64(s[i], t[i], b) for b in grid])
        assert np.all(d[1:] >= d[:-1] - 1e-12), i  # inf >= inf holds
        dt = tr.torch_blend_kl(np.tile(s[i], (41, 1)), np.tile(t[i], (41, 1)), grid).numpy()
        np.testing.assert_allclose(dt, d, rtol=1e-10, atol=1e-12)


def test_solve_beta_numpy_vs_torch_random():
    s, t = _random_rows(3, n=24)
    rng = np.random.default_rng(4)
    eps = np.exp(rng.uniform(np.log(1e-4), np.log(2.0), size=s.shape[0]))
    log_mu, beta, kl = tr.torch_blend(s, t, eps)
    assert not torch.any(torch.isnan(log_mu)) and not torch.any(torch.isnan(kl))
    for i in range(s.shape[0]):
        b = nr.solve_beta64(s[i], t[i], eps[i])
        assert abs(beta[i].item() - b) < 1e-9, (i, b, beta[i].item())
        assert kl[i].item() <= eps[i] + 1e-12
        ref = nr.blend_log_probs64(s[i], t[i], beta[i].item())
        np.testing.assert_allclose(log_mu[i].numpy(), ref, rtol=1e-9, atol=1e-9)
        assert abs(kl[i].item() - nr.blend_kl64(s[i], t[i], beta[i].item())) < 1e-9
    # special rows behave as designed
    assert beta[0].item() == 0.0  # disjoint
    assert beta[3].item() == 1.0  # identical


def test_torch_blend_float32():
    s, t = _random_rows(5, n=12)
    eps = 0.05
    _, b64, _ = tr.torch_blend(s, t, eps)
    lm32, b32, kl32 = tr.torch_blend(torch.tensor(s, dtype=torch.float32), torch.tensor(t, dtype=torch.float32), eps)
    assert lm32.dtype == torch.float32 and not torch.any(torch.isnan(lm32))
    np.testing.assert_allclose(b32.double().numpy(), b64.numpy(), atol=2e-3)


# ------------------------------------------------------------------------------------------
# losses: numpy vs torch
# ------------------------------------------------------------------------------------------
def test_losses_numpy_vs_torch_random():
    s, t = _random_rows(6, n=24, vocab=11)
    rng = np.random.default_rng(7)
    tokens = np.array([rng.choice(np.flatnonzero(np.isfinite(row) & np.isfinite(trow)))
                       if np.any(np.isfinite(row) & np.isfinite(trow)) else int(np.argmax(row))
                       for row, trow in zip(s, t)])
    cases = [
        (nr.reverse_kl_full64, tr.torch_reverse_kl, ()),
        (nr.forward_kl_full64, tr.torch_forward_kl, ()),
    ]
    for k in (1, 4, 11):
        for ren in (True, False):
            cases.append((nr.topk_reverse_kl64, tr.torch_topk_reverse_kl, (k, ren)))
            cases.append((nr.topk_forward_kl64, tr.torch_topk_forward_kl, (k, ren)))
    for nfn, tfn, args in cases:
        ref = nr.apply_rows(nfn, s, t, *args)
        got = tfn(s, t, *args).numpy()
        assert not np.any(np.isnan(got)), nfn.__name__
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-12, err_msg=f"{nfn.__name__}{args}")
    ref = nr.apply_rows(nr.k1_64, s, t, per_row=[tokens])
    np.testing.assert_allclose(tr.torch_k1(s, t, tokens).numpy(), ref, rtol=1e-12, atol=1e-12)
    # leading dims (2, 12)
    got = tr.torch_topk_reverse_kl(s.reshape(2, 12, 11), t.reshape(2, 12, 11), 4, True)
    assert got.shape == (2, 12)
    np.testing.assert_allclose(got.numpy().reshape(-1), nr.apply_rows(nr.topk_reverse_kl64, s, t, 4, True),
                               rtol=1e-10, atol=1e-12)


def test_topk_full_support_equals_full_kl():
    rng = np.random.default_rng(8)
    s = rng.normal(size=6); t = rng.normal(size=6)
    for ren in (True, False):
        assert np.isclose(nr.topk_reverse_kl64(s, t, 6, ren), nr.reverse_kl_full64(s, t))
        assert np.isclose(nr.topk_forward_kl64(s, t, 6, ren), nr.forward_kl_full64(s, t))


def test_topk_ties_lower_index():
    s = np.array([1.0, 3.0, 3.0, NEG_INF, NEG_INF, 3.0])
    np.testing.assert_array_equal(nr.topk_ids64(s, 2), [1, 2])
    np.testing.assert_array_equal(nr.topk_ids64(s, 5), [1, 2, 5, 0, 3])
    np.testing.assert_array_equal(tr.torch_topk_ids(torch.tensor(s), 5).numpy(), [1, 2, 5, 0, 3])


def test_kl_inf_conventions():
    lp = nr.log_softmax64(np.array([0.0, NEG_INF, 0.0]))
    lq = nr.log_softmax64(np.array([0.0, 0.0, NEG_INF]))
    assert nr.kl64(lp, lq) == math.inf
    assert nr.kl64(lq, lq) == 0.0
    assert tr.torch_kl(torch.tensor(lp), torch.tensor(lq)).item() == math.inf
    assert tr.torch_kl(torch.tensor(lq), torch.tensor(lq)).item() == 0.0


def test_masked_mean():
    x = np.array([1.0, 2.0, np.inf, np.nan, 6.0])
    m = np.array([1, 1, 0, 0, 1])
    assert nr.masked_mean64(x, m) == 3.0
    assert tr.torch_masked_mean(x, m).item() == 3.0
    assert nr.masked_mean64(x, np.zeros(5)) == 0.0
    assert tr.torch_masked_mean(x, np.zeros(5)).item() == 0.0
    x2 = np.array([[1.0, 3.0], [5.0, np.inf]])
    m2 = np.array([[1, 1], [0, 0]])
    np.testing.assert_array_equal(tr.torch_masked_mean(x2, m2, dim=-1).numpy(), [2.0, 0.0])


def test_merge_eos():
    rng = np.random.default_rng(9)
    x = rng.normal(size=(3, 8))
    x[1, 5] = NEG_INF
    out = nr.merge_eos64(x, eos_ids=[5, 7], stop_id=2)
    for r in range(3):
        np.testing.assert_allclose(out[r, [0, 1, 3, 4, 6]], x[r, [0, 1, 3, 4, 6]])
        assert out[r, 5] == NEG_INF and out[r, 7] == NEG_INF
        assert np.isclose(np.exp(out[r, 2]), np.exp(x[r, [2, 5, 7]]).sum())
        p_in, p_out = np.exp(nr.log_softmax64(x[r])), np.exp(nr.log_softmax64(out[r]))
        assert np.isclose(p_out[2], p_in[[2, 5, 7]].sum())
    np.testing.assert_allclose(tr.torch_merge_eos(x, [5, 7], 2).numpy(), out)
    # stop id that is also listed, and a single-row input
    np.testing.assert_array_equal(nr.merge_eos64(x[0], [2, 7], 2), nr.merge_eos64(x[0], [7], 2))
    np.testing.assert_allclose(nr.merge_eos64(x[1], [5, 7], 2), out[1])


# ------------------------------------------------------------------------------------------
# gradients: analytic vs finite differences vs autograd
# ------------------------------------------------------------------------------------------
def _grad_cases(k=3):
    cases = [
        (nr.reverse_kl_full64, nr.grad_reverse_kl_full64, tr.torch_reverse_kl, ()),
        (nr.forward_kl_full64, nr.grad_forward_kl_full64, tr.torch_forward_kl, ()),
    ]
    for ren in (True, False):
        cases.append((nr.topk_reverse_kl64, nr.grad_topk_reverse_kl64, tr.torch_topk_reverse_kl, (k, ren)))
        cases.append((nr.topk_forward_kl64, nr.grad_topk_forward_kl64, tr.torch_topk_forward_kl, (k, ren)))
    return cases


def test_analytic_gradients_vs_finite_differences():
    rng = np.random.default_rng(10)
    for _ in range(3):
        s = rng.normal(size=7); t = rng.normal(size=7)
        for fn, gfn, _, args in _grad_cases():
            g = gfn(s, t, *args)
            fd = nr.finite_diff_grad64(lambda x: fn(x, t, *args), s)
            np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-8, err_msg=f"{fn.__name__}{args}")
        a = int(rng.integers(0, 7))
        adv = nr.k1_64(s, t, a)
        fd = nr.finite_diff_grad64(lambda x: adv * nr.log_softmax64(x)[a], s)
        np.testing.assert_allclose(nr.grad_k1_pg64(s, t, a), fd, rtol=1e-6, atol=1e-8)


def test_analytic_gradients_vs_autograd_with_masks():
    s, t = _random_rows(11, n=24, vocab=9)
    for fn, gfn, tfn, args in _grad_cases():
        g_t = tr.torch_student_grad(tfn, s, t, *args).numpy()
        for i in range(s.shape[0]):
            if not np.isfinite(fn(s[i], t[i], *args)):
                continue
            g = gfn(s[i], t[i], *args)
            assert not np.any(np.isnan(g_t[i]))
            np.testing.assert_allclose(g_t[i], g, rtol=1e-9, atol=1e-12, err_msg=f"{fn.__name__}{args} row {i}")
            assert np.all(g[~np.isfinite(s[i])] == 0.0)
    rng = np.random.default_rng(12)
    tokens = np.array([rng.choice(np.flatnonzero(np.isfinite(r))) for r in s])
    g_t = tr.torch_student_grad(tr.torch_k1_pg_surrogate, s, t, tokens).numpy()
    for i in range(s.shape[0]):
        if np.isfinite(nr.k1_64(s[i], t[i], tokens[i])):
            np.testing.assert_allclose(g_t[i], nr.grad_k1_pg64(s[i], t[i], tokens[i]), rtol=1e-10, atol=1e-12)


def test_teacher_outside_student_support_saturates_below_one():
    # supp pi_T not inside supp pi_S: D(1) = inf, but D(1-) = KL(pi_T|I || pi_S) is finite, so for a
    # budget above D(1-) the bisection runs up to the largest float64 below 1 and never returns 1.
    s = np.array([0.0, 0.5, NEG_INF])
    t = np.array([0.2, 0.0, 1.0])
    d_lim = nr.kl64(nr.log_softmax64(t[:2]), nr.log_softmax64(s[:2]))
    assert nr.blend_kl64(s, t, 1.0) == math.inf
    assert abs(nr.blend_kl64(s, t, 1.0 - 1e-12) - d_lim) < 1e-9
    eps = d_lim + 0.1
    b = nr.solve_beta64(s, t, eps)
    assert b == np.nextafter(1.0, 0.0)
    log_mu, tb, kl = tr.torch_blend(s, t, eps)
    assert tb.item() == b and np.isfinite(kl.item()) and kl.item() <= eps
    assert log_mu[2].item() == NEG_INF and not torch.any(torch.isnan(log_mu))
