"""Float64 NumPy reference for TRB (Trust-Region Behavior Blending) and the distillation losses.

Slow and deliberately explicit: every function works on ONE row (1-D logits over the vocabulary)
and loops over entries where that makes the zero-probability conventions obvious.  Use
``apply_rows`` to map a row function over leading dimensions.

Conventions (see docs/method.md, sections 1-3):
  * logits may contain -inf (masked tokens); a row with every entry -inf is invalid.
  * mu_beta ∝ pi_S^(1-beta) pi_T^beta.  beta == 0 -> exactly pi_S, beta == 1 -> exactly pi_T,
    0 < beta < 1 -> supported on I = {pi_S > 0 and pi_T > 0} (undefined, ``None``, if I is empty).
  * 0 * (-inf) is never evaluated: terms with zero weight are skipped.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

NEG_INF = -np.inf

__all__ = [
    "log_softmax64",
    "blend_log_probs64",
    "kl64",
    "blend_kl64",
    "blend_kl_zero_plus64",
    "solve_beta64",
    "reverse_kl_full64",
    "forward_kl_full64",
    "topk_ids64",
    "topk_reverse_kl64",
    "topk_forward_kl64",
    "k1_64",
    "masked_mean64",
    "grad_reverse_kl_full64",
    "grad_forward_kl_full64",
    "grad_topk_reverse_kl64",
    "grad_topk_forward_kl64",
    "grad_k1_pg64",
    "finite_diff_grad64",
    "merge_eos64",
    "apply_rows",
]


# ----------------------------------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------------------------------
def _row(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D row, got shape {x.shape}")
    return x


def _logsumexp_row(x: np.ndarray) -> float:
    """log sum exp over a 1-D float64 array; -inf entries contribute nothing; all -inf -> -inf."""
    finite = x[np.isfinite(x)]
    if np.any(np.isposinf(x)) or np.any(np.isnan(x)):
        raise ValueError("logsumexp: +inf or NaN entry")
    if finite.size == 0:
        return float(NEG_INF)
    m = float(np.max(finite))
    return m + math.log(float(np.sum(np.exp(finite - m))))


def log_softmax64(logits) -> np.ndarray:
    """log softmax of one row in float64.  -inf logits give -inf log-probs (probability 0).

    Raises ValueError for a row whose entries are all -inf, or that holds +inf / NaN.
    """
    x = _row(logits)
    if np.any(np.isnan(x)) or np.any(np.isposinf(x)):
        raise ValueError("log_softmax64: NaN or +inf logit")
    if not np.any(np.isfinite(x)):
        raise ValueError("log_softmax64: every logit is -inf (no support)")
    lse = _logsumexp_row(x)
    out = np.full_like(x, NEG_INF)
    fin = np.isfinite(x)
    out[fin] = x[fin] - lse
    return out


def _probs(log_p: np.ndarray) -> np.ndarray:
    p = np.zeros_like(log_p)
    fin = np.isfinite(log_p)
    p[fin] = np.exp(log_p[fin])
    return p


# ----------------------------------------------------------------------------------------------
# KL and blending
# ----------------------------------------------------------------------------------------------
def kl64(log_p, log_q) -> float:
    """KL(p || q) = sum_{p(a) > 0} p(a) (log p(a) - log q(a)); +inf if some p(a) > 0 has q(a) = 0."""
    log_p = _row(log_p)
    log_q = _row(log_q)
    total = 0.0
    for lp, lq in zip(log_p, log_q):
        if lp == NEG_INF:  # p(a) = 0: contributes 0, whatever q(a) is
            continue
        if lq == NEG_INF:
            return float("inf")
        total += math.exp(lp) * (lp - lq)
    return float(total)


def blend_log_probs64(student_logits, teacher_logits, beta: float) -> Optional[np.ndarray]:
    """log mu_beta, mu_beta ∝ pi_S^(1-beta) pi_T^beta.

    beta == 0 -> log pi_S exactly; beta == 1 -> log pi_T exactly; 0 < beta < 1 -> supported on
    I = supp(pi_S) ∩ supp(pi_T); returns None when I is empty (mu_beta undefined).
    """
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    ls = log_softmax64(student_logits)
    lt = log_softmax64(teacher_logits)
    if ls.shape != lt.shape:
        raise ValueError("student/teacher vocabulary mismatch")
    if beta == 0.0:
        return ls.copy()
    if beta == 1.0:
        return lt.copy()
    inter = np.isfinite(ls) & np.isfinite(lt)
    if not np.any(inter):
        return None
    z = np.full_like(ls, NEG_INF)
    # only finite entries are combined, so (1 - beta) * (-inf) / beta * (-inf) never occur
    z[inter] = (1.0 - beta) * ls[inter] + beta * lt[inter]
    return z - _logsumexp_row(z)


def blend_kl64(student_logits, teacher_logits, beta: float) -> float:
    """D(beta) = KL(mu_beta || pi_S); +inf where mu_beta is undefined (empty I, 0 < beta < 1)."""
    log_mu = blend_log_probs64(student_logits, teacher_logits, beta)
    if log_mu is None:
        return float("inf")
    return kl64(log_mu, log_softmax64(student_logits))


def blend_kl_zero_plus64(student_logits, teacher_logits) -> float:
    """D(0+) = lim_{beta -> 0+} D(beta) = -log pi_S(I)  (0 when supp pi_S ⊆ supp pi_T, inf if I = {})."""
    ls = log_softmax64(student_logits)
    lt = log_softmax64(teacher_logits)
    inter = np.isfinite(ls) & np.isfinite(lt)
    if not np.any(inter):
        return float("inf")
    if np.all(inter[np.isfinite(ls)]):
        return 0.0
    return float(-_logsumexp_row(np.where(inter, ls, NEG_INF)))


def solve_beta64(student_logits, teacher_logits, eps: float, iters: int = 100) -> float:
    """beta* = sup{beta in [0, 1] : D(beta) <= eps}.

    1.0 if D(1) = KL(pi_T || pi_S) <= eps; 0.0 if eps <= D(0+); otherwise ``iters`` float64
    bisection halvings on [0, 1], returning the feasible lower end.
    """
    eps = float(eps)
    d1 = blend_kl64(student_logits, teacher_logits, 1.0)
    if d1 <= eps:
        return 1.0
    if eps <= blend_kl_zero_plus64(student_logits, teacher_logits):
        return 0.0
    lo, hi = 0.0, 1.0
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if blend_kl64(student_logits, teacher_logits, mid) <= eps:
            lo = mid
        else:
            hi = mid
    return lo


# ----------------------------------------------------------------------------------------------
# losses (per row, return a Python float)
# ----------------------------------------------------------------------------------------------
def reverse_kl_full64(student_logits, teacher_logits) -> float:
    """KL(pi_S || pi_T) over the full vocabulary."""
    return kl64(log_softmax64(student_logits), log_softmax64(teacher_logits))


def forward_kl_full64(student_logits, teacher_logits) -> float:
    """KL(pi_T || pi_S) over the full vocabulary."""
    return kl64(log_softmax64(teacher_logits), log_softmax64(student_logits))


def topk_ids64(logits, k: int) -> np.ndarray:
    """Ids of the k largest logits, ties broken by the lower index."""
    x = _row(logits)
    if not 1 <= k <= x.shape[0]:
        raise ValueError(f"k={k} out of range for vocabulary {x.shape[0]}")
    return np.argsort(-x, kind="stable")[:k]


def _partial_kl(log_p: np.ndarray, log_q: np.ndarray, ids: np.ndarray) -> float:
    """sum_{a in ids, p(a) > 0} p(a) (log p(a) - log q(a)); inf if q(a) = 0 for such a."""
    return kl64(log_p[ids], log_q[ids])


def _renormalized_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """KL(softmax(p_logits) || softmax(q_logits)); +inf when q has no support on these ids
    (p always has support here: it is restricted to its own top-k)."""
    if not np.any(np.isfinite(q_logits)):
        return float("inf")
    return kl64(log_softmax64(p_logits), log_softmax64(q_logits))


def topk_reverse_kl64(student_logits, teacher_logits, k: int, renormalize: bool) -> float:
    """Reverse KL on the student's top-k support.

    renormalize=True : KL(softmax(s[K]) || softmax(t[K])).
    renormalize=False: sum_{a in K} p_S(a) (log p_S(a) - log p_T(a)) with full-vocab p_S, p_T.
    """
    s = _row(student_logits)
    t = _row(teacher_logits)
    ids = topk_ids64(s, k)
    if renormalize:
        return _renormalized_kl(s[ids], t[ids])
    return _partial_kl(log_softmax64(s), log_softmax64(t), ids)


def _with_tail64(log_p: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """[p(a) for a in ids] + [1 - sum of them] (the tail bucket), in float64 probabilities."""
    p = _probs(log_p)
    inside = p[ids]
    return np.append(inside, max(1.0 - float(np.sum(inside)), 0.0))


def _coarse_kl64(p: np.ndarray, q: np.ndarray) -> float:
    """KL(p || q) of two probability vectors; +inf where p > 0 = q."""
    on = p > 0
    if np.any(on & (q <= 0)):
        return float("inf")
    return float(np.sum(p[on] * (np.log(p[on]) - np.log(q[on]))))


def topk_reverse_kl_support64(student_logits, teacher_logits, k: int, support: str) -> float:
    """Reverse KL on the student's top-k support K, by support treatment:

    renormalized   : KL(softmax(s[K]) || softmax(t[K])).
    tail_bucket    : KL over the k + 1 outcomes {a in K} + {everything else}, each model's
                     full-vocab probabilities (a lower bound on the full KL: log-sum inequality).
    unrenormalized : sum_{a in K} p_S(a) (log p_S(a) - log p_T(a)).
    """
    if support == "tail_bucket":
        s, t = _row(student_logits), _row(teacher_logits)
        ids = topk_ids64(s, k)
        return _coarse_kl64(_with_tail64(log_softmax64(s), ids), _with_tail64(log_softmax64(t), ids))
    return topk_reverse_kl64(student_logits, teacher_logits, k, support == "renormalized")


def grad_topk_reverse_kl_support64(student_logits, teacher_logits, k: int,
                                   support: str) -> np.ndarray:
    """Gradient of ``topk_reverse_kl_support64`` w.r.t. s (K fixed).

    tail_bucket: the KL of a coarse-graining o(.) of the vocabulary (outcomes: each a in K, and
    the tail) has d/ds_i = p_i (d_o(i) - L), d_o = log P_S(o) - log P_T(o), L the loss (from
    dP(o)/ds_i = [i in o] p_i - P(o) p_i and sum_o P(o) = 1).
    """
    if support != "tail_bucket":
        return grad_topk_reverse_kl64(student_logits, teacher_logits, k, support == "renormalized")
    s, t = _row(student_logits), _row(teacher_logits)
    ids = topk_ids64(s, k)
    ls, lt = log_softmax64(s), log_softmax64(t)
    ps, pt = _with_tail64(ls, ids), _with_tail64(lt, ids)
    loss = _coarse_kl64(ps, pt)
    d = np.log(ps) - np.log(pt)
    p = _probs(ls)
    g = p * (d[-1] - loss)
    g[ids] = p[ids] * (d[:-1] - loss)
    return g


def topk_forward_kl64(student_logits, teacher_logits, k: int, renormalize: bool) -> float:
    """Forward KL on the teacher's top-k support.

    renormalize=True : KL(softmax(t[K]) || softmax(s[K])).
    renormalize=False: sum_{a in K} p_T(a) (log p_T(a) - log p_S(a)) with full-vocab p_T, p_S.
    """
    s = _row(student_logits)
    t = _row(teacher_logits)
    ids = topk_ids64(t, k)
    if renormalize:
        return _renormalized_kl(t[ids], s[ids])
    return _partial_kl(log_softmax64(t), log_softmax64(s), ids)


def k1_64(student_logits, teacher_logits, token: int) -> float:
    """K1 estimator on the sampled token: log p_S(token) - log p_T(token)."""
    ls = log_softmax64(student_logits)
    lt = log_softmax64(teacher_logits)
    return float(ls[int(token)] - lt[int(token)])


def masked_mean64(x, mask) -> float:
    """Mean of x over the entries where mask is set (nonzero / True); 0.0 if the mask is empty.

    Entries outside the mask are ignored entirely (they may be inf / NaN).
    """
    x = np.asarray(x, dtype=np.float64)
    m = np.asarray(mask).astype(bool)
    if x.shape != m.shape:
        raise ValueError(f"shape mismatch {x.shape} vs {m.shape}")
    sel = x[m]
    if sel.size == 0:
        return 0.0
    return float(np.sum(sel) / sel.size)


# ----------------------------------------------------------------------------------------------
# analytic gradients w.r.t. the STUDENT logits (teacher fixed)
# ----------------------------------------------------------------------------------------------
def grad_reverse_kl_full64(student_logits, teacher_logits) -> np.ndarray:
    """d KL(pi_S || pi_T) / d s = p_S * (d - KL), d = log p_S - log p_T (0 where p_S = 0)."""
    ls = log_softmax64(student_logits)
    lt = log_softmax64(teacher_logits)
    p = _probs(ls)
    loss = kl64(ls, lt)
    g = np.zeros_like(p)
    on = p > 0
    g[on] = p[on] * ((ls[on] - lt[on]) - loss)
    return g


def grad_forward_kl_full64(student_logits, teacher_logits) -> np.ndarray:
    """d KL(pi_T || pi_S) / d s = p_S - p_T."""
    return _probs(log_softmax64(student_logits)) - _probs(log_softmax64(teacher_logits))


def grad_topk_reverse_kl64(student_logits, teacher_logits, k: int, renormalize: bool) -> np.ndarray:
    """Gradient of ``topk_reverse_kl64`` w.r.t. s with the top-k id set K held fixed.

    renormalize=True : on K, p'(d' - L) with p' = softmax(s[K]), d' = log p' - log q'; 0 off K.
    renormalize=False: g_j = [j in K] p_j (d_j + 1) - p_j (L + P_K), P_K = sum_K p.
    """
    s = _row(student_logits)
    t = _row(teacher_logits)
    ids = topk_ids64(s, k)
    g = np.zeros_like(s)
    if renormalize:
        g[ids] = grad_reverse_kl_full64(s[ids], t[ids])
        return g
    ls = log_softmax64(s)
    lt = log_softmax64(t)
    p = _probs(ls)
    loss = _partial_kl(ls, lt, ids)
    pk = float(np.sum(p[ids]))
    g = -p * (loss + pk)
    for a in ids:
        if p[a] > 0:
            g[a] += p[a] * ((ls[a] - lt[a]) + 1.0)
    return g


def grad_topk_forward_kl64(student_logits, teacher_logits, k: int, renormalize: bool) -> np.ndarray:
    """Gradient of ``topk_forward_kl64`` w.r.t. s with the teacher top-k id set K held fixed.

    renormalize=True : on K, p'_S - p'_T (both renormalised over K); 0 off K.
    renormalize=False: g_j = p_S(j) Q_K - [j in K] p_T(j), Q_K = sum_K p_T.
    """
    s = _row(student_logits)
    t = _row(teacher_logits)
    ids = topk_ids64(t, k)
    g = np.zeros_like(s)
    if renormalize:
        g[ids] = grad_forward_kl_full64(s[ids], t[ids])
        return g
    p = _probs(log_softmax64(s))
    q = _probs(log_softmax64(t))
    g = p * float(np.sum(q[ids]))
    g[ids] -= q[ids]
    return g


def grad_k1_pg64(student_logits, teacher_logits, token: int) -> np.ndarray:
    """Gradient of L = stopgrad(log p_S(a) - log p_T(a)) * log p_S(a):
    (log p_S(a) - log p_T(a)) * (onehot(a) - p_S)."""
    adv = k1_64(student_logits, teacher_logits, token)
    p = _probs(log_softmax64(student_logits))
    onehot = np.zeros_like(p)
    onehot[int(token)] = 1.0
    return adv * (onehot - p)


def finite_diff_grad64(fn: Callable[[np.ndarray], float], x, h: float = 1e-6) -> np.ndarray:
    """Central finite differences of a scalar function of a 1-D float64 array (finite entries only)."""
    x = _row(x).copy()
    g = np.zeros_like(x)
    for i in range(x.shape[0]):
        if not np.isfinite(x[i]):
            continue
        xp = x.copy()
        xm = x.copy()
        xp[i] += h
        xm[i] -= h
        g[i] = (fn(xp) - fn(xm)) / (2.0 * h)
    return g


# ----------------------------------------------------------------------------------------------
# EOS canonicalisation
# ----------------------------------------------------------------------------------------------
def merge_eos64(logits, eos_ids: Sequence[int], stop_id: int) -> np.ndarray:
    """Merge the probability mass of every EOS token onto ``stop_id``.

    E = set(eos_ids) | {stop_id}: out[stop_id] = logsumexp(logits[E]); out[e] = -inf for the other
    e in E; all other ids unchanged.  Works on the last axis (leading dims allowed).
    """
    x = np.asarray(logits, dtype=np.float64)
    ids = sorted(set(int(e) for e in eos_ids) | {int(stop_id)})
    out = x.copy()
    flat_in = x.reshape(-1, x.shape[-1])
    flat_out = out.reshape(-1, x.shape[-1])
    for r in range(flat_in.shape[0]):
        merged = _logsumexp_row(flat_in[r, ids])
        for e in ids:
            flat_out[r, e] = NEG_INF
        flat_out[r, int(stop_id)] = merged
    return flat_out.reshape(x.shape)


# ----------------------------------------------------------------------------------------------
# vectorising helper
# ----------------------------------------------------------------------------------------------
def apply_rows(fn: Callable[..., float], student_logits, teacher_logits, *args, per_row=None) -> np.ndarray:
    """Apply a row function fn(s_row, t_row, *args, *per_row_values) over the leading dims.

    ``per_row`` is an optional sequence of arrays shaped like the leading dims (e.g. sampled tokens,
    per-row eps); their entries are passed after ``args``.  Returns float64 results shaped
    leading_dims (scalar outputs) or leading_dims + output shape.
    """
    s = np.asarray(student_logits, dtype=np.float64)
    t = np.asarray(teacher_logits, dtype=np.float64)
    if s.shape != t.shape:
        raise ValueError("student/teacher shape mismatch")
    lead = s.shape[:-1]
    fs = s.reshape(-1, s.shape[-1])
    ft = t.reshape(-1, t.shape[-1])
    extra = [np.broadcast_to(np.asarray(a), lead).reshape(-1) for a in (per_row or ())]
    outs = []
    for r in range(fs.shape[0]):
        outs.append(np.asarray(fn(fs[r], ft[r], *args, *[e[r] for e in extra]), dtype=np.float64))
    out = np.stack(outs) if outs else np.zeros((0,))
    return out.reshape(lead + out.shape[1:])
