"""OPD and TRB in PyTorch on transformers' Qwen3ForCausalLM, written from the method alone.

The reference side of `python -m trb_jax.tools.compare_torch`: what a PyTorch stack (verl, TRL)
would compute for one OPD update and for the TRB behavior at a prefix. Nothing here imports
trb_jax; the formulas are the method's (docs/architecture.md, docs/train_step.md):

* EOS merge: every native stop id of either model (`eos.eos_ids`) moves its probability onto one
  stop slot (`eos.stop_id`) by logsumexp, on both models' logits, before any softmax.
* OPD per-token loss: on the student's top-k support (k largest EOS-merged student log-probs,
  ties to the lower id), KL(pi_S || pi_T); `renormalize=True` renormalises both over the k ids
  (the configs' choice), False sums p_S log(p_S / p_T) there with full-vocabulary probabilities.
  The token mean over the response mask is the loss; the teacher runs under `no_grad`.
* One update: `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW` at the learning rate of
  the warmup + cosine schedule for that step (`warmup_cosine_lr`).
* TRB behavior: mu_beta ∝ pi_S^(1 - beta) pi_T^beta, beta* = max{beta in [0, 1]:
  KL(mu_beta || pi_S) <= eps} by bisection in float64 (D is monotone in beta).

torch and transformers are imported inside the functions: trb_jax does not depend on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class EosLike(Protocol):
    """The shared stop event: `stop_id` carries it, `eos_ids` are all native stop ids."""

    stop_id: int
    eos_ids: Sequence[int]


def _torch():
    import torch

    return torch


def torch_dtype(name: str):
    torch = _torch()
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def load_model(directory: str | Path, dtype: str = "float32"):
    """transformers' Qwen3ForCausalLM from a local checkpoint directory (safetensors only)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch_dtype(dtype), use_safetensors=True, trust_remote_code=False
    ).eval()


def _long(x):
    torch = _torch()
    return torch.as_tensor(np.asarray(x), dtype=torch.long)


def logits(model, input_ids_bs, attention_mask_bs):
    """float32 logits [B, S, V]; positions count real tokens only (left padding is skipped)."""
    mask = _long(attention_mask_bs)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(_long(input_ids_bs), attention_mask=mask, position_ids=positions)
    return out.logits.float()


def response_logits(model, input_ids_bs, attention_mask_bs, t: int):
    """float32 logits [B, T, V] predicting the last T columns (column c is predicted at c - 1)."""
    z = logits(model, input_ids_bs, attention_mask_bs)
    s = z.shape[1]
    return z[:, s - t - 1 : s - 1]


def merge_eos(logits_v, eos: EosLike | None):
    """Moves all EOS probability onto eos.stop_id (logsumexp); the other EOS slots become -inf."""
    if eos is None:
        return logits_v
    torch = _torch()
    v = logits_v.shape[-1]
    ids = torch.as_tensor(list(eos.eos_ids), dtype=torch.long)
    is_eos = torch.zeros(v, dtype=torch.bool)
    is_eos[ids] = True
    is_stop = torch.zeros(v, dtype=torch.bool)
    is_stop[int(eos.stop_id)] = True
    stop = torch.logsumexp(logits_v[..., ids], dim=-1, keepdim=True)
    neg_inf = torch.full_like(logits_v, -math.inf)
    return torch.where(is_stop, stop, torch.where(is_eos, neg_inf, logits_v))


def log_probs(logits_v, eos: EosLike | None):
    """EOS-merged log-softmax, float32 (float64 inputs stay float64)."""
    torch = _torch()
    z = merge_eos(logits_v, eos)
    if z.dtype not in (torch.float32, torch.float64):
        z = z.float()
    return torch.log_softmax(z, dim=-1)


def topk_ids(log_p_v, k: int):
    """Ids [..., k] of the k largest entries, ties to the lower id (a stable descending sort)."""
    torch = _torch()
    return torch.sort(log_p_v.detach(), dim=-1, descending=True, stable=True).indices[..., :k]


def _kl(log_p, log_q):
    """KL(p || q) over the last axis; p = 0 terms are 0 (no 0 * inf)."""
    torch = _torch()
    support = log_p > -math.inf
    lp = torch.where(support, log_p, torch.zeros_like(log_p))
    lq = torch.where(support, log_q, torch.zeros_like(log_q))
    return torch.where(support, lp.exp() * (lp - lq), torch.zeros_like(lp)).sum(-1)


def opd_token_loss(student_logits_btv, teacher_logits_btv, *, top_k: int = 16,
                   eos: EosLike | None = None, renormalize: bool = True):
    """(per-token KL(pi_S || pi_T) on the student's top-k support [B, T], support ids [B, T, k]).

    Gradients flow into the student logits only.
    """  # fmt: skip
    torch = _torch()
    log_s = log_probs(student_logits_btv, eos)
    with torch.no_grad():
        log_t = log_probs(teacher_logits_btv.detach(), eos)
    ids = topk_ids(log_s, top_k)
    log_s_k = torch.gather(log_s, -1, ids)
    log_t_k = torch.gather(log_t, -1, ids)
    if renormalize:
        log_s_k = log_s_k - torch.logsumexp(log_s_k, dim=-1, keepdim=True)
        log_t_k = log_t_k - torch.logsumexp(log_t_k, dim=-1, keepdim=True)
    return _kl(log_s_k, log_t_k), ids


def masked_mean(x_bt, mask_bt):
    """Token mean over mask != 0 (0 for an empty mask)."""
    torch = _torch()
    m = torch.as_tensor(np.asarray(mask_bt), dtype=torch.float32)
    return (torch.where(m > 0, x_bt, torch.zeros_like(x_bt)) * m).sum() / m.sum().clamp(min=1.0)


def warmup_cosine_lr(step: int, *, peak_lr: float, warmup_steps: int = 0, decay_steps: int = 1000,
                     end_lr_fraction: float = 0.0) -> float:
    """The learning rate of update `step` (0-based): linear 0 -> peak over warmup_steps, then
    cosine from peak to peak * end_lr_fraction, reached at decay_steps (counted from step 0)."""  # fmt: skip
    end = peak_lr * end_lr_fraction
    if warmup_steps and step < warmup_steps:
        return peak_lr * step / warmup_steps
    decay_steps = max(decay_steps, warmup_steps + 1)
    frac = min(step - warmup_steps, decay_steps - warmup_steps) / (decay_steps - warmup_steps)
    return end + (peak_lr - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def named_params(model) -> dict[str, Any]:
    """Trainable parameters by HF name (a tied lm_head appears once, as the embedding)."""
    return dict(model.named_parameters())


def clip_adamw_step(model, *, lr: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                    weight_decay: float = 0.0, clip_norm: float = 1.0) -> dict[str, Any]:
    """Global-norm clip + one torch.optim.AdamW step on the gradients already in `p.grad`.

    Returns grad_norm (before clipping, float) and updates {name: float64 NumPy p_new - p_old}
    (exact: the difference of two float32 or bfloat16 numbers).
    A fresh optimizer: this is the first update of a run (bias corrections of step 1).
    """  # fmt: skip
    torch = _torch()
    params = named_params(model)
    before = {k: p.detach().clone() for k, p in params.items()}
    grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), clip_norm)
    opt = torch.optim.AdamW(list(params.values()), lr=lr, betas=(b1, b2), eps=eps,
                            weight_decay=weight_decay)  # fmt: skip
    opt.step()
    updates = {k: (p.detach().double() - before[k].double()).numpy() for k, p in params.items()}
    return {"grad_norm": float(grad_norm), "updates": updates}


def opd_update(student, teacher, batch: dict[str, np.ndarray], *, top_k: int = 16,
               eos: EosLike | None = None, renormalize: bool = True, lr: float,
               b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
               clip_norm: float = 1.0) -> dict[str, Any]:
    """One OPD update of `student` (in place) on one batch.

    batch: input_ids_bs / attention_mask_bs [B, S] (student), teacher_input_ids_bs /
    teacher_attention_mask_bs [B, S'] (teacher), response_mask_bt [B, T]; both sequences end with
    the same T response columns. Returns loss (float), loss_bt, ids_btk and the EOS-merged
    student_logits_btv / teacher_logits_btv (NumPy, before the update), grads {HF name: float32 NumPy}, grad_norm,
    updates {HF name: float64 NumPy}.
    """  # fmt: skip
    torch = _torch()
    t = batch["response_mask_bt"].shape[1]
    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        z_t = response_logits(teacher, batch["teacher_input_ids_bs"], batch["teacher_attention_mask_bs"], t)
    z_s = response_logits(student, batch["input_ids_bs"], batch["attention_mask_bs"], t)
    loss_bt, ids = opd_token_loss(z_s, z_t, top_k=top_k, eos=eos, renormalize=renormalize)
    loss = masked_mean(loss_bt, batch["response_mask_bt"])
    loss.backward()
    grads = {k: p.grad.detach().float().numpy().copy() for k, p in named_params(student).items()}
    step = clip_adamw_step(student, lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                           clip_norm=clip_norm)  # fmt: skip
    return {"loss": float(loss.detach()), "loss_bt": loss_bt.detach().numpy(), "ids_btk": ids.numpy(),
            "student_logits_btv": merge_eos(z_s.detach(), eos).numpy(),
            "teacher_logits_btv": merge_eos(z_t, eos).numpy(), "grads": grads, **step}  # fmt: skip


def set_grads(model, grads: dict[str, np.ndarray]) -> None:
    """p.grad = grads[name] (cast to the parameter's dtype), for an optimizer-only comparison."""
    torch = _torch()
    for name, p in named_params(model).items():
        p.grad = torch.as_tensor(np.asarray(grads[name], np.float32)).to(p.dtype).reshape(p.shape)


# ---------------------------------------------------------------------------------------------
# The TRB behavior at a prefix, float64


def blend_kl(log_s, log_t, beta):
    """D(beta) = KL(mu_beta || pi_S) per row (float64 tensors, beta [...]), and log mu_beta.

    beta = 0 is pi_S, beta = 1 is pi_T; in between mu_beta lives where both are > 0.
    """
    torch = _torch()
    b = beta.unsqueeze(-1)
    both = torch.isfinite(log_s) & torch.isfinite(log_t)
    z = torch.where(both, (1.0 - b) * torch.where(both, log_s, 0.0) + b * torch.where(both, log_t, 0.0),
                    torch.full_like(log_s, -math.inf))  # fmt: skip
    log_mu = z - torch.logsumexp(z, dim=-1, keepdim=True)
    log_mu = torch.where(b == 0, log_s, torch.where(b == 1, log_t, log_mu))
    return _kl(log_mu, log_s), log_mu


def trb_blend(student_logits_v, teacher_logits_v, eps: float, *, eos: EosLike | None = None,
              iters: int = 100) -> dict[str, Any]:
    """The TRB behavior per row ([..., V] logits of each model at the same prefixes), float64.

    Returns float64 tensors: beta [...] (beta*: 0 for eps = 0, 1 where KL(pi_T || pi_S) <= eps,
    else the feasible end of a bisection bracket of width 2^-iters), kl [...] = KL(mu* || pi_S) <= eps,
    log_mu [..., V], log_s / log_t [..., V] (EOS-merged log-softmaxes).
    """  # fmt: skip
    torch = _torch()
    with torch.no_grad():
        log_s = log_probs(student_logits_v.double(), eos)
        log_t = log_probs(teacher_logits_v.double(), eos)
        lead = log_s.shape[:-1]
        one = torch.ones(lead, dtype=torch.float64)
        lo, hi = torch.zeros(lead, dtype=torch.float64), one.clone()
        feasible_at_one = blend_kl(log_s, log_t, one)[0] <= eps
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            ok = blend_kl(log_s, log_t, mid)[0] <= eps
            lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
        # eps = 0 is pi_S exactly (D's float64 rounding, ~1e-16, would admit beta ~ 1e-8)
        beta = torch.where(feasible_at_one, one, lo) if eps > 0 else torch.zeros_like(lo)
        kl, log_mu = blend_kl(log_s, log_t, beta)
    return {"beta": beta, "kl": kl, "log_mu": log_mu, "log_s": log_s, "log_t": log_t}


def greedy_response(model, input_ids_bt, attention_mask_bt, t: int, eos: EosLike | None = None,
                    native_eos_id: int | None = None) -> np.ndarray:
    """[B, T] int64: T greedy tokens after each left-padded prompt (EOS-merged argmax; a stop is
    written as `native_eos_id`, default eos.stop_id). Rows keep decoding after a stop; the caller
    masks those columns. One full forward per token: for short comparison responses only."""  # fmt: skip
    torch = _torch()
    ids = np.asarray(input_ids_bt, np.int64)
    mask = np.asarray(attention_mask_bt, np.int64)
    out = []
    with torch.no_grad():
        for _ in range(t):
            z = logits(model, ids, mask)[:, -1]
            tok = log_probs(z, eos).argmax(-1).numpy()
            if eos is not None:
                tok = np.where(tok == eos.stop_id, eos.stop_id if native_eos_id is None else native_eos_id, tok)
            out.append(tok)
            ids = np.concatenate([ids, tok[:, None]], axis=1)
            mask = np.concatenate([mask, np.ones_like(tok)[:, None]], axis=1)
    return np.stack(out, axis=1)
