"""Independent PyTorch reference for TRB blending and the distillation losses.

Vectorised over leading batch dims (the vocabulary is the last axis).  float64 by default; float32
inputs are computed in float32.  -inf logits are masks; every reduction goes through torch.where
with safe fill values so that 0 * (-inf) (and the NaN gradients it would cause) never appears.

Gradients: pass student logits with requires_grad=True (teacher logits are detached inside), or
use ``torch_student_grad``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "as_tensor",
    "torch_log_softmax",
    "torch_kl",
    "torch_blend_log_probs",
    "torch_blend_kl",
    "torch_blend",
    "torch_reverse_kl",
    "torch_forward_kl",
    "torch_topk_ids",
    "torch_topk_reverse_kl",
    "torch_topk_forward_kl",
    "torch_k1",
    "torch_k1_pg_surrogate",
    "torch_masked_mean",
    "torch_merge_eos",
    "torch_student_grad",
]

TensorLike = Union[torch.Tensor, np.ndarray, Sequence[float], float]


def as_tensor(x: TensorLike, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Tensor view of x; numpy / python inputs default to float64, tensors keep their float dtype."""
    if isinstance(x, torch.Tensor):
        if dtype is not None and x.dtype != dtype:
            return x.to(dtype)
        if not x.is_floating_point():
            return x.to(torch.float64)
        return x
    return torch.as_tensor(np.asarray(x), dtype=dtype or torch.float64)


def _pair(student_logits: TensorLike, teacher_logits: TensorLike) -> Tuple[torch.Tensor, torch.Tensor]:
    s = as_tensor(student_logits)
    t = as_tensor(teacher_logits, dtype=s.dtype).detach()
    if s.shape != t.shape:
        raise ValueError(f"student/teacher shape mismatch {tuple(s.shape)} vs {tuple(t.shape)}")
    return s, t


def torch_log_softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits, dim=-1)


def torch_kl(log_p: torch.Tensor, log_q: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """KL(p || q) along ``dim``; terms with p = 0 are 0; +inf where p > 0 and q = 0."""
    support = log_p > float("-inf")
    lp = torch.where(support, log_p, torch.zeros_like(log_p))
    lq = torch.where(support, log_q, torch.zeros_like(log_q))
    terms = torch.where(support, lp.exp() * (lp - lq), torch.zeros_like(lp))
    return terms.sum(dim=dim)


# ----------------------------------------------------------------------------------------------
# blending
# ----------------------------------------------------------------------------------------------
def _blend_parts(s: torch.Tensor, t: torch.Tensor):
    ls = torch_log_softmax(s)
    lt = torch_log_softmax(t)
    inter = torch.isfinite(ls) & torch.isfinite(lt)
    any_inter = inter.any(dim=-1)
    return ls, lt, inter, any_inter


def _interior_log_mu(ls, lt, inter, any_inter, beta: torch.Tensor) -> torch.Tensor:
    """log mu_beta for 0 < beta < 1 (beta shaped like the leading dims); -inf rows where I is empty."""
    neg_inf = torch.full_like(ls, float("-inf"))
    b = beta.unsqueeze(-1)
    ls0 = torch.where(inter, ls, torch.zeros_like(ls))
    lt0 = torch.where(inter, lt, torch.zeros_like(lt))
    z = torch.where(inter, (1.0 - b) * ls0 + b * lt0, neg_inf)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    lse_safe = torch.where(any_inter.unsqueeze(-1), lse, torch.zeros_like(lse))
    return torch.where(inter, z - lse_safe, neg_inf)


def _interior_kl(ls, lt, inter, any_inter, beta: torch.Tensor) -> torch.Tensor:
    log_mu = _interior_log_mu(ls, lt, inter, any_inter, beta)
    d = torch_kl(log_mu, ls)
    return torch.where(any_inter, d, torch.full_like(d, float("inf")))


def torch_blend_log_probs(student_logits: TensorLike, teacher_logits: TensorLike,
                          beta: TensorLike) -> torch.Tensor:
    """log mu_beta with the end conventions: beta == 0 -> log pi_S, beta == 1 -> log pi_T,
    otherwise supported on supp pi_S ∩ supp pi_T (all -inf rows where that is empty)."""
    s, t = _pair(student_logits, teacher_logits)
    ls, lt, inter, any_inter = _blend_parts(s, t)
    b = torch.broadcast_to(as_tensor(beta, dtype=s.dtype), s.shape[:-1])
    mid = _interior_log_mu(ls, lt, inter, any_inter, b.clamp(0.0, 1.0))
    bb = b.unsqueeze(-1)
    return torch.where(bb == 0, ls, torch.where(bb == 1, lt, mid))


def torch_blend_kl(student_logits: TensorLike, teacher_logits: TensorLike, beta: TensorLike) -> torch.Tensor:
    """D(beta) = KL(mu_beta || pi_S) per row (inf where mu_beta is undefined)."""
    s, t = _pair(student_logits, teacher_logits)
    ls, lt, inter, any_inter = _blend_parts(s, t)
    b = torch.broadcast_to(as_tensor(beta, dtype=s.dtype), s.shape[:-1])
    mid = _interior_kl(ls, lt, inter, any_inter, b.clamp(0.0, 1.0))
    d1 = torch_kl(lt, ls)
    return torch.where(b == 0, torch.zeros_like(mid), torch.where(b == 1, d1, mid))


@torch.no_grad()
def torch_blend(student_logits: TensorLike, teacher_logits: TensorLike, eps: TensorLike,
                iters: int = 60) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Trust-region blend: returns (log mu_{beta*}, beta*, KL(mu_{beta*} || pi_S)).

    beta* = 1 where KL(pi_T || pi_S) <= eps; 0 where eps <= D(0+) = -log pi_S(I); otherwise
    ``iters`` vectorised bisection steps on [0, 1] keeping the feasible lower end.
    ``eps`` is a scalar or broadcastable to the leading dims.
    """
    s, t = _pair(student_logits, teacher_logits)
    s = s.detach()
    ls, lt, inter, any_inter = _blend_parts(s, t)
    lead = s.shape[:-1]
    eps_t = torch.broadcast_to(as_tensor(eps, dtype=s.dtype), lead)

    d1 = torch_kl(lt, ls)  # D(1)
    mass_i = torch.logsumexp(torch.where(inter, ls, torch.full_like(ls, float("-inf"))), dim=-1)
    d0p = -mass_i  # D(0+); +inf for empty I
    student_inside = ~(torch.isfinite(ls) & ~inter).any(dim=-1)
    d0p = torch.where(student_inside, torch.zeros_like(d0p), d0p)

    def d_of(b: torch.Tensor) -> torch.Tensor:
        # D(beta) with the end conventions (beta == 1 means exactly pi_T, so D(1) = KL(pi_T || pi_S))
        inner = _interior_kl(ls, lt, inter, any_inter, b)
        return torch.where(b == 0, torch.zeros_like(inner), torch.where(b == 1, d1, inner))

    lo = torch.zeros(lead, dtype=s.dtype)
    hi = torch.ones(lead, dtype=s.dtype)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        ok = d_of(mid) <= eps_t
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)

    take_one = d1 <= eps_t
    take_zero = (~take_one) & (eps_t <= d0p)
    beta = torch.where(take_one, torch.ones_like(lo), torch.where(take_zero, torch.zeros_like(lo), lo))

    # beta == 0 -> exactly log pi_S, beta == 1 -> exactly log pi_T, else the interior blend
    b1 = beta.unsqueeze(-1)
    log_mid = _interior_log_mu(ls, lt, inter, any_inter, beta)
    log_mu = torch.where(b1 == 1, lt, torch.where(b1 == 0, ls, log_mid))
    kl = d_of(beta)
    return log_mu, beta, kl


# ----------------------------------------------------------------------------------------------
# losses: per-token outputs over the leading dims
# ----------------------------------------------------------------------------------------------
def torch_reverse_kl(student_logits: TensorLike, teacher_logits: TensorLike) -> torch.Tensor:
    """KL(pi_S || pi_T) per token."""
    s, t = _pair(student_logits, teacher_logits)
    return torch_kl(torch_log_softmax(s), torch_log_softmax(t))


def torch_forward_kl(student_logits: TensorLike, teacher_logits: TensorLike) -> torch.Tensor:
    """KL(pi_T || pi_S) per token."""
    s, t = _pair(student_logits, teacher_logits)
    return torch_kl(torch_log_softmax(t), torch_log_softmax(s))


def torch_topk_ids(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k ids along the last axis, ties broken by the lower index.

    torch.topk does not document its tie order, so ties (e.g. several -inf logits) are broken by a
    stable descending sort; without ties the result equals torch.topk's index set.
    """
    return torch.sort(logits.detach(), dim=-1, descending=True, stable=True).indices[..., :k]


def _topk_kl(log_p_full, log_q_full, p_logits, q_logits, ids, renormalize: bool) -> torch.Tensor:
    if renormalize:
        lp = torch_log_softmax(torch.gather(p_logits, -1, ids))
        q_k = torch.gather(q_logits, -1, ids)
        q_any = torch.isfinite(q_k).any(dim=-1)
        # q without support on K: the renormalised KL is +inf; keep the log_softmax input finite
        q_k = torch.where(q_any.unsqueeze(-1), q_k, torch.zeros_like(q_k))
        lq = torch_log_softmax(q_k)
        kl = torch_kl(lp, lq)
        return torch.where(q_any, kl, torch.full_like(kl, float("inf")))
    else:
        lp = torch.gather(log_p_full, -1, ids)
        lq = torch.gather(log_q_full, -1, ids)
    return torch_kl(lp, lq)


def torch_topk_reverse_kl(student_logits: TensorLike, teacher_logits: TensorLike, k: int,
                          renormalize: bool) -> torch.Tensor:
    """Reverse KL on the student's top-k ids (id set not differentiated)."""
    s, t = _pair(student_logits, teacher_logits)
    ids = torch_topk_ids(s, k)
    return _topk_kl(torch_log_softmax(s), torch_log_softmax(t), s, t, ids, renormalize)


def torch_topk_forward_kl(student_logits: TensorLike, teacher_logits: TensorLike, k: int,
                          renormalize: bool) -> torch.Tensor:
    """Forward KL(pi_T || pi_S) on the teacher's top-k ids."""
    s, t = _pair(student_logits, teacher_logits)
    ids = torch_topk_ids(t, k)
    return _topk_kl(torch_log_softmax(t), torch_log_softmax(s), t, s, ids, renormalize)


def torch_k1(student_logits: TensorLike, teacher_logits: TensorLike, tokens: TensorLike) -> torch.Tensor:
    """log p_S(token) - log p_T(token) per position; tokens shaped like the leading dims."""
    s, t = _pair(student_logits, teacher_logits)
    tok = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).long()
    tok = torch.broadcast_to(tok, s.shape[:-1]).unsqueeze(-1)
    ls = torch.gather(torch_log_softmax(s), -1, tok).squeeze(-1)
    lt = torch.gather(torch_log_softmax(t), -1, tok).squeeze(-1)
    return ls - lt


def torch_k1_pg_surrogate(student_logits: TensorLike, teacher_logits: TensorLike,
                          tokens: TensorLike) -> torch.Tensor:
    """Policy-gradient surrogate stopgrad(log p_S(a) - log p_T(a)) * log p_S(a) per position."""
    s, t = _pair(student_logits, teacher_logits)
    adv = torch_k1(s, t, tokens).detach()
    tok = torch.as_tensor(np.asarray(tokens) if not isinstance(tokens, torch.Tensor) else tokens).long()
    tok = torch.broadcast_to(tok, s.shape[:-1]).unsqueeze(-1)
    logp_a = torch.gather(torch_log_softmax(s), -1, tok).squeeze(-1)
    return adv * logp_a


def torch_masked_mean(x: TensorLike, mask: TensorLike, dim=None) -> torch.Tensor:
    """Mean of x over the set entries of mask (reduced over ``dim``, default all); 0 if empty.

    Entries outside the mask are replaced before summation, so inf/NaN there does not leak.
    """
    xt = as_tensor(x)
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask).bool()
    m = torch.broadcast_to(m, xt.shape)
    vals = torch.where(m, xt, torch.zeros_like(xt))
    if dim is None:
        total, count = vals.sum(), m.sum()
    else:
        total, count = vals.sum(dim=dim), m.sum(dim=dim)
    count = count.to(xt.dtype)
    return torch.where(count > 0, total / count.clamp(min=1.0), torch.zeros_like(total))


def torch_merge_eos(logits: TensorLike, eos_ids: Sequence[int], stop_id: int) -> torch.Tensor:
    """Merge every EOS token's mass onto stop_id (logsumexp), the other EOS ids become -inf."""
    x = as_tensor(logits)
    ids = torch.tensor(sorted(set(int(e) for e in eos_ids) | {int(stop_id)}), dtype=torch.long)
    merged = torch.logsumexp(x.index_select(-1, ids), dim=-1)
    is_eos = torch.zeros(x.shape[-1], dtype=torch.bool)
    is_eos[ids] = True
    out = torch.where(is_eos, torch.full_like(x, float("-inf")), x)
    is_stop = torch.zeros(x.shape[-1], dtype=torch.bool)
    is_stop[int(stop_id)] = True
    return torch.where(is_stop, merged.unsqueeze(-1), out)


def torch_student_grad(loss_fn: Callable[..., torch.Tensor], student_logits: TensorLike,
                       teacher_logits: TensorLike, *args) -> torch.Tensor:
    """d sum(loss_fn(s, t, *args)) / d s via autograd (teacher detached)."""
    s = as_tensor(student_logits).detach().clone().requires_grad_(True)
    t = as_tensor(teacher_logits, dtype=s.dtype).detach()
    loss = loss_fn(s, t, *args).sum()
    (g,) = torch.autograd.grad(loss, s)
    return g
