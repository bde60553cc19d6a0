"""Trust-region behavior blending: the per-token solve at the heart of TRB.

For a student distribution pi_S and a teacher distribution pi_T over the same vocabulary,

    mu_beta = pi_S^(1 - beta) pi_T^beta / Z_beta,      r = log pi_T - log pi_S,
    D(beta) = KL(mu_beta || pi_S) = beta E_mu[r] - log Z_beta,
    beta*   = max { beta in [0, 1] : D(beta) <= eps }.

Support conventions (the only ones that make the solve well defined with -inf logits):
  * beta == 0 is exactly pi_S and beta == 1 is exactly pi_T;
  * for 0 < beta < 1, mu_beta lives on I = supp(pi_S) ∩ supp(pi_T); if I is empty it does not
    exist and D = +inf there;
  * D(0+) = -log pi_S(I) (0 when supp pi_S ⊆ supp pi_T) and D(1) = KL(pi_T || pi_S) (+inf when
    supp pi_T ⊄ supp pi_S). D is non-decreasing on [0, 1], so the feasible set is an interval
    starting at 0 and bisection is correct.

Numerics: D is evaluated in float32 from the centred r_c = r - E_{pi_S|I}[r] (taken exactly from
the raw logits) with the first-order terms cancelled analytically, so that D(beta) ~ beta^2
Var(r) / 2 keeps its relative precision for tiny budgets and near-identical policies instead of
sinking into the 1e-7 absolute floor of `log(sum(probs))`. No 0 * (-inf) is ever formed: every -inf
is replaced by a finite value under a mask before any product.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BlendResult",
    "trust_region_blend",
    "blend_log_probs",
    "blend_kl",
    "merge_eos",
    "stop_to_native",
    "EosMap",
    "SOLVERS",
]

SOLVERS = ("bisection", "newton")
_DEFAULT_MAX_ITERS = {"bisection": 64, "newton": 64}
# Up to this max of beta r_c, D uses the cancellation-free series form (no overflow: e^20 ~ 5e8).
_SERIES_MAX_X = 20.0


class BlendResult(NamedTuple):
    """Output of `trust_region_blend`.

    log_probs: [..., V] float32, normalised log mu_{beta*} (-inf outside its support).
    beta:      [...] float32 in [0, 1], the largest feasible interpolation weight found.
    kl:        [...] float32, KL(mu_{beta*} || pi_S) <= eps.
    iters:     [...] int32, solver evaluations of D the row needed before its bracket closed.
    """

    log_probs: jax.Array
    beta: jax.Array
    kl: jax.Array
    iters: jax.Array


class _RowStats(NamedTuple):
    """Per-row quantities that do not depend on beta (computed once per solve)."""

    log_s: jax.Array  # [..., V] log pi_S (float32, -inf off support)
    log_t: jax.Array  # [..., V] log pi_T
    in_i: jax.Array  # [..., V] bool, token in I = supp pi_S ∩ supp pi_T
    log_w: jax.Array  # [..., V] log pi_S(a | I), -inf off I (log space: no underflow to "off I")
    w_in: jax.Array  # [..., V] pi_S(a | I) = exp(log_w)
    rc: jax.Array  # [..., V] r - E_{pi_S|I}[r] on I, 0 off I (always finite)
    log_mass_in: jax.Array  # [...] log pi_S(I) <= 0
    has_overlap: jax.Array  # [...] bool, I non-empty
    t_in_s: jax.Array  # [...] bool, supp pi_T ⊆ supp pi_S
    var_s: jax.Array  # [...] Var_{pi_S|I}(r) = E_s[r_c^2]
    m1: jax.Array  # [...] E_s[r_c] as computed (0 up to rounding)
    m3: jax.Array  # [...] E_s[r_c^3]
    s_rel: jax.Array  # [..., V] raw student logits minus their max over I, 0 off I


_SUM_BLOCK = 64


def _sum_v(x: jax.Array, keepdims: bool = False) -> jax.Array:
    """Sum over the last (vocabulary) axis as a tree of 64-wide blocks.

    A single float32 reduce over 151,936 terms accumulates rounding like a running sum (about
    sqrt(V) * 2^-24 relative, 2e-5 at Qwen3's vocabulary, and more on some CPUs), which is larger
    than the solver's 1e-5 budget tolerance. Blocks of 64 summed level by level bound the error by
    about (64 * levels) * 2^-24 * sum|x| in the worst case and ~1e-7 typically. The optimization
    barrier stops XLA from folding the levels back into one reduce.
    """
    while x.shape[-1] > _SUM_BLOCK:
        n = x.shape[-1]
        pad = (-n) % _SUM_BLOCK
        if pad:
            x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
        x = jnp.sum(x.reshape(*x.shape[:-1], (n + pad) // _SUM_BLOCK, _SUM_BLOCK), axis=-1)
        x = jax.lax.optimization_barrier(x)
    return jnp.sum(x, axis=-1, keepdims=keepdims)


def _log_softmax_v(x: jax.Array) -> jax.Array:
    """log_softmax over the last axis with the normaliser summed by `_sum_v` (-inf stays -inf)."""
    m = jnp.max(x, axis=-1, keepdims=True)
    m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
    shifted = x - m
    return shifted - jnp.log(_sum_v(jnp.exp(shifted), keepdims=True))


def _masked_lse(x: jax.Array, mask: jax.Array) -> jax.Array:
    """logsumexp over mask (-inf for an empty mask, never NaN)."""
    x_m = jnp.where(mask, x, -jnp.inf)
    m = jnp.max(x_m, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    return jnp.log(_sum_v(jnp.exp(x_m - m))) + m[..., 0]


def _two_diff(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a - b = hi + lo exactly (Knuth's TwoSum): hi is the float32 difference, lo its error."""
    hi = a - b
    a_virtual = hi + b
    b_virtual = a_virtual - hi
    lo = (a - a_virtual) + (b_virtual - b)
    return hi, lo


def _row_stats(student_logits: jax.Array, teacher_logits: jax.Array) -> _RowStats:
    s32 = student_logits.astype(jnp.float32)
    t32 = teacher_logits.astype(jnp.float32)
    log_s = jax.nn.log_softmax(s32, axis=-1)
    log_t = jax.nn.log_softmax(t32, axis=-1)
    in_s = log_s > -jnp.inf
    in_t = log_t > -jnp.inf
    in_i = in_s & in_t
    out_s = in_s & ~in_t
    has_overlap = jnp.any(in_i, axis=-1)
    t_in_s = ~jnp.any(in_t & ~in_s, axis=-1)

    # Condition pi_S on I in log space: a token whose pi_S underflows to 0 in float32 is still
    # in I and can carry most of mu_beta's mass once beta > 0. log_s itself is jax.nn's (the
    # exact beta = 0 end returns it bit for bit); lse_in, summed precisely, removes the rounding
    # of its normaliser from the weights.
    lse_in = _masked_lse(log_s, in_i)
    lse_out = _masked_lse(log_s, out_s)
    log_w = jnp.where(in_i, log_s - jnp.where(has_overlap, lse_in, 0.0)[..., None], -jnp.inf)
    w_in = jnp.exp(log_w)
    # log pi_S(I): exactly 0 when supp pi_S ⊆ supp pi_T; log1p(-outside mass) keeps precision
    # when little mass lies outside I.
    log_mass_in = jnp.where(
        jnp.any(out_s, axis=-1),
        jnp.where(lse_out < -0.7, jnp.log1p(-jnp.exp(lse_out)), lse_in),
        0.0,
    )
    # r = t - s up to a per-row constant (which cancels in r_c, all D needs), taken from the raw
    # logits as an exact hi + lo pair: log-softmax outputs and a plain float32 difference both
    # round at the logits' magnitude, far above r's spread for near-identical policies.
    r_hi, r_lo = _two_diff(jnp.where(in_i, t32, 0.0), jnp.where(in_i, s32, 0.0))
    r_mean = _sum_v(w_in * r_hi) + _sum_v(w_in * r_lo)
    rc1 = jnp.where(in_i, (r_hi - r_mean[..., None]) + r_lo, 0.0)
    # Second centring pass: when r carries a large constant (teacher logits offset by 3e4),
    # the first mean rounds at that magnitude, and a leftover mean comparable to r's spread
    # would spoil the series form's cancellation.
    rc = jnp.where(in_i, rc1 - _sum_v(w_in * rc1, keepdims=True), 0.0)
    w_rc = w_in * rc
    var_s = _sum_v(w_rc * rc)
    m1 = _sum_v(w_rc)
    m3 = _sum_v(w_rc * rc * rc)
    s_max_in = jnp.max(jnp.where(in_i, s32, -jnp.inf), axis=-1, keepdims=True)
    s_rel = jnp.where(in_i, s32 - jnp.where(jnp.isfinite(s_max_in), s_max_in, 0.0), 0.0)
    return _RowStats(log_s, log_t, in_i, log_w, w_in, rc, log_mass_in, has_overlap, t_in_s, var_s,
                     m1, m3, s_rel)


def _expm1_minus_x(x: jax.Array) -> jax.Array:
    """e^x - 1 - x to float32 relative precision (a Taylor series where expm1(x) - x cancels)."""
    series = x * x * (0.5 + x * (1 / 6 + x * (1 / 24 + x * (1 / 120 + x * (
        1 / 720 + x * (1 / 5040 + x * (1 / 40320 + x / 362880)))))))
    return jnp.where(jnp.abs(x) < 0.5, series, jnp.expm1(x) - x)


class _Moments(NamedTuple):
    d: jax.Array  # D(beta)
    var_mu: jax.Array  # Var_{mu_beta}(r)


def _log1p_sum_exp(d: jax.Array, mask: jax.Array) -> jax.Array:
    """log(1 + sum_{mask} e^d) over the last axis, to relative precision when the sum is small."""
    d_m = jnp.where(mask, d, -jnp.inf)
    m = jnp.maximum(jnp.max(d_m, axis=-1), 0.0)
    total = _sum_v(jnp.exp(d_m - m[..., None]))
    return jnp.where(m > 0, m + jnp.log(jnp.exp(-m) + total), jnp.log1p(total))


def _moments_series(st: _RowStats, beta: jax.Array) -> _Moments:
    """Small x = beta r_c (max x <= 20): series form, precise for tiny budgets.

    E_s is the expectation under pi_S conditioned on I and h(x) = e^x - 1 - x. With
    m1 = E_s[r_c] ~ 0 and V = E_s[r_c^2]:
      A = E_s[e^x] - 1   = beta m1 + E_s[h],
      B = E_s[e^x r_c]   = m1 + beta V + E_s[h r_c],
      C = E_s[e^x r_c^2] = V + beta E_s[r_c^3] + E_s[h r_c^2],
      D = beta B / (1 + A) - log1p(A) - log pi_S(I).
    The first-order terms beta m1 cancel exactly and h has no cancellation, so D ~ beta^2 V / 2
    keeps float32 relative precision. (A weight that underflows contributes < e^(-103 + 20).)
    """
    x = beta[..., None] * st.rc
    wh = st.w_in * _expm1_minus_x(x)
    a = beta * st.m1 + _sum_v(wh)
    e_rc = st.m1 + beta * st.var_s + _sum_v(wh * st.rc)
    e_rc2 = st.var_s + beta * st.m3 + _sum_v(wh * st.rc * st.rc)
    z = jnp.maximum(1.0 + a, jnp.finfo(jnp.float32).tiny)
    mean_mu = e_rc / z
    var_mu = jnp.maximum(e_rc2 / z - mean_mu * mean_mu, 0.0)
    d = beta * mean_mu - jnp.log1p(a) - st.log_mass_in
    return _Moments(d=d, var_mu=var_mu)


def _moments_pivot(st: _RowStats, beta: jax.Array) -> _Moments:
    r"""Any x, relative to the pivot token * = argmax of log mu_beta: precise when mu_beta and
    pi_S concentrate on few tokens (large logits), where log-sum-exp forms lose D in rounding.

    With ds = s - s_*, dx = x - x_*, dv = ds + dx over I \ {*}:
      P = sum e^dv,  Q = sum e^ds,  mu_a = e^dv_a / (1 + P),
      D = E_mu[dx] - log1p(P) + log1p(Q) - log pi_S(I).
    """
    b = beta[..., None]
    x = b * st.rc
    v = jnp.where(st.in_i, st.s_rel + x, -jnp.inf)
    star = jnp.argmax(v, axis=-1)[..., None]
    not_star = st.in_i & (jnp.arange(v.shape[-1]) != star)
    ds = jnp.where(not_star, st.s_rel - jnp.take_along_axis(st.s_rel, star, axis=-1), 0.0)
    drc = jnp.where(not_star, st.rc - jnp.take_along_axis(st.rc, star, axis=-1), 0.0)
    dx = b * drc
    dv = ds + dx
    log1p_p = _log1p_sum_exp(dv, not_star)
    log1p_q = _log1p_sum_exp(ds, not_star)
    mu = jnp.where(not_star, jnp.exp(jnp.where(not_star, dv, 0.0) - log1p_p[..., None]), 0.0)
    e_drc = _sum_v(mu * drc)
    var_mu = jnp.maximum(_sum_v(mu * drc * drc) - e_drc * e_drc, 0.0)
    d = beta * e_drc - log1p_p + log1p_q - st.log_mass_in
    return _Moments(d=d, var_mu=var_mu)


def _moments(st: _RowStats, beta: jax.Array) -> _Moments:
    """D(beta) and Var_mu(r) for beta in (0, 1] on I (beta = 1 is valid only when I = supp pi_T).

    Rows with max beta r_c <= 20 use the series form; the others the pivot form, which is only
    computed when some row needs it.
    """
    x_max = jnp.max(jnp.where(st.in_i, beta[..., None] * st.rc, -jnp.inf), axis=-1)
    big = x_max > _SERIES_MAX_X
    series = _moments_series(st, beta)
    out = jax.lax.cond(
        jnp.any(big),
        lambda: jax.tree.map(lambda p, q: jnp.where(big, p, q), _moments_pivot(st, beta), series),
        lambda: series,
    )
    d = jnp.where(st.has_overlap, jnp.maximum(out.d, 0.0), jnp.inf)  # D >= 0 up to rounding
    return _Moments(d=d, var_mu=jnp.where(st.has_overlap, out.var_mu, 0.0))


def _kl_at(st: _RowStats, beta: jax.Array) -> jax.Array:
    """D(beta) on all of [0, 1], with the exact end conventions."""
    interior = _moments(st, jnp.clip(beta, 1e-30, 1.0)).d
    at_one = jnp.where(st.t_in_s, interior, jnp.inf)
    return jnp.where(beta <= 0, 0.0, jnp.where(beta >= 1, at_one, interior))


def _log_mu(st: _RowStats, beta: jax.Array) -> jax.Array:
    """Normalised log mu_beta with beta == 0 -> log pi_S and beta == 1 -> log pi_T exactly."""
    logits = jnp.where(st.in_i, st.log_s, -jnp.inf) + beta[..., None] * st.rc
    interior = _log_softmax_v(logits)
    # An empty intersection only ever pairs with beta = 0 (D = inf elsewhere).
    interior = jnp.where(st.has_overlap[..., None], interior, st.log_s)
    b = beta[..., None]
    return jnp.where(b <= 0, st.log_s, jnp.where(b >= 1, st.log_t, interior))


def _kl_rough(st: _RowStats) -> tuple[jax.Array, jax.Array]:
    """KL(pi_T || pi_S) as a plain sum over log-probs (+inf when supp pi_T ⊄ supp pi_S), and a
    bound on its float32 error (log-probs round at their own magnitude)."""
    p_t = jnp.where(st.in_i, jnp.exp(st.log_t), 0.0)
    log_s = jnp.where(st.in_i, st.log_s, 0.0)
    log_t = jnp.where(st.in_i, st.log_t, 0.0)
    kl = _sum_v(p_t * (log_t - log_s))
    err = 1e-4 + 1e-5 * jnp.sum(p_t * (jnp.abs(log_t) + jnp.abs(log_s)), axis=-1)
    return jnp.where(st.t_in_s & st.has_overlap, kl, jnp.inf), err


class _SolveState(NamedTuple):
    lo: jax.Array  # [...] largest beta known feasible
    hi: jax.Array  # [...] smallest beta known infeasible (or 1)
    d_lo: jax.Array  # [...] D(lo), so the result needs no extra evaluation
    x: jax.Array  # [...] next point to evaluate (Newton); last midpoint (bisection)
    iters: jax.Array  # [...] int32 evaluations per row until its bracket closed
    step: jax.Array  # scalar int32 loop counter


def _d_one(st: _RowStats, eps: jax.Array) -> jax.Array:
    """D(1) = KL(pi_T || pi_S), evaluated precisely only where it could be within the budget.

    The plain sum over log-probs is enough to rule beta = 1 out for most rows; the precise
    evaluation (which may need the pivot form) runs only if some row is within its error bound.
    """
    rough, err = _kl_rough(st)
    close = jnp.any(rough <= eps + err)
    return jax.lax.cond(close, lambda: _kl_at(st, jnp.ones_like(eps)), lambda: rough)


def _initial_state(st: _RowStats, eps: jax.Array, x0: jax.Array | None = None) -> _SolveState:
    """Rows decided without iterating: beta* = 1 if D(1) <= eps, beta* = 0 if eps <= D(0+)."""
    d_one = _d_one(st, eps)
    d_zero_plus = jnp.where(st.has_overlap, -st.log_mass_in, jnp.inf)
    take_one = d_one <= eps
    take_zero = (~take_one) & (eps <= d_zero_plus)
    lo = jnp.where(take_one, 1.0, 0.0).astype(jnp.float32)
    hi = jnp.where(take_zero, 0.0, 1.0).astype(jnp.float32)
    d_lo = jnp.where(take_one, d_one, 0.0).astype(jnp.float32)
    x = lo if x0 is None else jnp.where((x0 > lo) & (x0 < hi), x0, 0.5 * (lo + hi))
    return _SolveState(lo, hi, d_lo, x, jnp.zeros(lo.shape, jnp.int32), jnp.int32(0))


def _open(s: _SolveState, tol) -> jax.Array:
    return s.hi - s.lo > tol


def _bisection(st: _RowStats, eps, tol, max_iters) -> _SolveState:
    def cond(s: _SolveState):
        return (s.step < max_iters) & jnp.any(_open(s, tol))

    def body(s: _SolveState):
        open_ = _open(s, tol)
        mid = 0.5 * (s.lo + s.hi)
        d = _kl_at(st, mid)
        feasible = d <= eps
        lo = jnp.where(open_ & feasible, mid, s.lo)
        d_lo = jnp.where(open_ & feasible, d, s.d_lo)
        hi = jnp.where(open_ & ~feasible, mid, s.hi)
        return _SolveState(lo, hi, d_lo, mid, s.iters + open_.astype(jnp.int32), s.step + 1)

    return jax.lax.while_loop(cond, body, _initial_state(st, eps))


def _newton(st: _RowStats, eps, tol, max_iters) -> _SolveState:
    """Safeguarded Newton on D(beta) - eps, D'(beta) = beta Var_mu(r), inside the bracket.

    Starts at sqrt(2 eps / Var_piS(r)). Every evaluated point tightens the bracket [lo, hi]. A
    Newton point outside the open bracket falls back to bisection. Once a Newton step is shorter
    than tol/4, the next probe sits tol/2 beyond the Newton point on the side that closes the
    bracket fastest, so the loop ends with hi - lo <= tol and returns lo, which is feasible.
    """
    x0 = jnp.sqrt(2.0 * jnp.maximum(eps, 0.0) / jnp.maximum(st.var_s, 1e-30))

    def cond(s: _SolveState):
        return (s.step < max_iters) & jnp.any(_open(s, tol))

    def body(s: _SolveState):
        open_ = _open(s, tol)
        x = jnp.clip(s.x, s.lo, s.hi)
        mom = _moments(st, jnp.maximum(x, 1e-30))
        # At x = 1 the interior formula is D(1) only when supp pi_T ⊆ supp pi_S.
        d = jnp.where((x >= 1) & ~st.t_in_s, jnp.inf, mom.d)
        feasible = d <= eps
        lo = jnp.where(open_ & feasible, x, s.lo)
        d_lo = jnp.where(open_ & feasible, d, s.d_lo)
        hi = jnp.where(open_ & ~feasible, x, s.hi)

        slope = x * mom.var_mu
        ok_slope = (slope > 0) & jnp.isfinite(d)
        newton = x - (d - eps) / jnp.where(ok_slope, slope, 1.0)
        inside = ok_slope & (newton > lo) & (newton < hi)
        # A converged step (also one that lands exactly on lo, i.e. D(x) == eps) probes just
        # past the root on the side whose bracket end is farther away, to close the bracket.
        small = ok_slope & (jnp.abs(newton - x) < 0.25 * tol)
        probe = jnp.where(newton - lo > hi - newton, newton - 0.5 * tol, newton + 0.5 * tol)
        probe_ok = small & (probe > lo) & (probe < hi)
        nxt = jnp.where(probe_ok, probe, jnp.where(inside & ~small, newton, 0.5 * (lo + hi)))
        return _SolveState(lo, hi, d_lo, nxt, s.iters + open_.astype(jnp.int32), s.step + 1)

    return jax.lax.while_loop(cond, body, _initial_state(st, eps, x0))


def _validate(student_logits, teacher_logits, eps, solver, tol) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    if jnp.shape(student_logits) != jnp.shape(teacher_logits):
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{jnp.shape(student_logits)} and {jnp.shape(teacher_logits)}"
        )
    if jnp.ndim(student_logits) < 1 or jnp.shape(student_logits)[-1] < 1:
        raise ValueError(f"logits need a vocabulary axis, got shape {jnp.shape(student_logits)}")
    batch_shape = jnp.shape(student_logits)[:-1]
    eps_shape = jnp.shape(eps)
    if eps_shape not in ((), batch_shape):
        raise ValueError(
            f"eps must be a scalar or have the batch shape {batch_shape}, got {eps_shape}"
        )
    if not (tol > 0):
        raise ValueError(f"tol must be > 0, got {tol}")
    if not isinstance(eps, jax.core.Tracer):  # concrete eps: check its values too
        eps_np = np.asarray(eps, dtype=np.float64)
        if np.any(eps_np < 0) or np.any(np.isnan(eps_np)):
            raise ValueError(f"eps must be >= 0 and not NaN, got {eps_np.min()}")


def trust_region_blend(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    eps: jax.Array | float,
    *,
    solver: str = "bisection",
    tol: float = 1e-6,
    max_iters: int | None = None,
) -> BlendResult:
    """Solves beta* = max{beta in [0,1]: KL(mu_beta || pi_S) <= eps} row by row.

    Args:
      student_logits: [..., V] float32 or bfloat16 logits of pi_S (-inf = masked out).
      teacher_logits: [..., V] logits of pi_T, same shape.
      eps: scalar or [...] budget (traced: a new value does not recompile).
      solver: "bisection" (the paper's) or "newton" (safeguarded; same beta to ~tol).
      tol: the solve stops once every row's bracket [lo, hi] is narrower than tol.
      max_iters: cap on evaluations of D (default 64).

    Returns a BlendResult. Guarantees: kl <= eps as evaluated in float32; beta = 1 and
    log_probs = log pi_T exactly when KL(pi_T || pi_S) <= eps; beta = 0 and log_probs =
    log pi_S exactly when eps = 0 (or eps <= -log pi_S(supp pi_T)). Each row needs at least one
    finite logit in each model. Math runs in float32 whatever the input dtype.
    """
    _validate(student_logits, teacher_logits, eps, solver, tol)
    if max_iters is None:
        max_iters = _DEFAULT_MAX_ITERS[solver]
    return _blend_jit(student_logits, teacher_logits, jnp.asarray(eps, jnp.float32),
                      solver=solver, tol=float(tol), max_iters=int(max_iters))


@functools.partial(jax.jit, static_argnames=("solver", "tol", "max_iters"))
def _blend_jit(student_logits, teacher_logits, eps, *, solver, tol, max_iters):
    return _blend_impl(student_logits, teacher_logits, eps, solver, tol, max_iters)


def _blend_impl(student_logits, teacher_logits, eps, solver, tol, max_iters) -> BlendResult:
    st = _row_stats(student_logits, teacher_logits)
    eps_b = jnp.broadcast_to(eps.astype(jnp.float32), st.var_s.shape)
    run = _bisection if solver == "bisection" else _newton
    out = run(st, eps_b, tol, max_iters)
    return BlendResult(log_probs=_log_mu(st, out.lo), beta=out.lo, kl=out.d_lo, iters=out.iters)


def blend_log_probs(student_logits: jax.Array, teacher_logits: jax.Array,
                    beta: jax.Array | float) -> jax.Array:
    """Normalised log mu_beta [..., V] for a given beta (scalar or [...]), same conventions."""
    st = _row_stats(student_logits, teacher_logits)
    return _log_mu(st, jnp.broadcast_to(jnp.asarray(beta, jnp.float32), st.var_s.shape))


def blend_kl(student_logits: jax.Array, teacher_logits: jax.Array,
             beta: jax.Array | float) -> jax.Array:
    """D(beta) = KL(mu_beta || pi_S) [...] (float32), +inf where mu_beta does not exist."""
    st = _row_stats(student_logits, teacher_logits)
    return _kl_at(st, jnp.broadcast_to(jnp.asarray(beta, jnp.float32), st.var_s.shape))


# ----------------------------------------------------------------------------------------------
# EOS canonicalisation
# ----------------------------------------------------------------------------------------------


class EosMap(NamedTuple):
    """How two models' native stop tokens map onto one shared stop event.

    stop_id: the vocabulary slot that carries the merged stop event in both distributions.
    eos_ids: every native EOS id of either model (student's and teacher's, union). Both
      distributions merge all of them, so "stop" means the same event on both sides: a Base
      student that emits the chat model's <|im_end|> has also stopped.
    """

    stop_id: int
    eos_ids: tuple[int, ...]

    @classmethod
    def from_ids(cls, student_eos: Sequence[int], teacher_eos: Sequence[int],
                 stop_id: int | None = None) -> "EosMap":
        ids = tuple(sorted(set(int(i) for i in student_eos) | set(int(i) for i in teacher_eos)))
        if not ids:
            raise ValueError("EosMap needs at least one EOS id")
        stop = int(student_eos[0]) if stop_id is None else int(stop_id)
        if stop not in ids:
            ids = tuple(sorted(ids + (stop,)))
        return cls(stop_id=stop, eos_ids=ids)


def merge_eos(logits_v: jax.Array, eos: EosMap) -> jax.Array:
    """Moves the probability of every id in eos.eos_ids onto eos.stop_id ([..., V] -> [..., V]).

    The stop slot gets logsumexp of the EOS logits, the other EOS slots -inf, so softmax mass
    is conserved exactly and a sampler can only ever emit stop_id as "stop".
    """
    vocab = logits_v.shape[-1]
    bad = [i for i in eos.eos_ids if not 0 <= i < vocab]
    if bad:
        raise ValueError(f"EOS ids {bad} are outside the vocabulary of size {vocab}")
    ids = jnp.asarray(eos.eos_ids, jnp.int32)
    stop_logit = jax.nn.logsumexp(logits_v[..., ids].astype(jnp.float32), axis=-1)
    out = logits_v.at[..., ids].set(-jnp.inf)
    return out.at[..., eos.stop_id].set(stop_logit.astype(logits_v.dtype))


def stop_to_native(tokens: jax.Array, eos: EosMap, native_eos_id: int) -> jax.Array:
    """Maps the shared stop event back to one model's native EOS token id for its sequence."""
    return jnp.where(tokens == eos.stop_id, jnp.asarray(native_eos_id, tokens.dtype), tokens)
