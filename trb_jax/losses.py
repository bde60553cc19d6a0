"""Per-token distillation losses over student/teacher log-probabilities.

Every loss is a small pure function returning a per-token value with the leading shape of its
inputs ([B, T] for a rollout batch); `masked_mean` reduces over response tokens. Teacher inputs
go through `stop_gradient`, so gradients reach only the student. -inf logits (masked
vocabularies) are handled without forming 0 * (-inf).

The OPD loss of the paper is `topk_reverse_kl`: KL(pi_theta || pi_T) on the student's top-k
support (k = 16). The configs use `renormalize=True` (the default): both distributions are
renormalised over the k tokens, which gives a proper divergence (>= 0, zero iff the two agree on
the support) whose gradient does not depend on how much student mass lies outside the k tokens.
`renormalize=False` is the partial sum sum_{a in top-k} p_S(a) log(p_S(a)/p_T(a)) with
full-vocabulary probabilities, as some OPD codebases compute it; it can be negative.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "DEFAULT_TOP_K",
    "kl_from_log_probs",
    "topk_support",
    "topk_reverse_kl",
    "topk_reverse_kl_from_log_probs",
    "reverse_kl",
    "forward_kl",
    "topk_forward_kl",
    "k1_estimate",
    "k1_policy_gradient_loss",
    "masked_mean",
    "masked_sequence_mean",
]

DEFAULT_TOP_K = 16


def _log_softmax32(logits: jax.Array) -> jax.Array:
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


def kl_from_log_probs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """KL(p || q) over the last axis from normalised log-probs; +inf if p puts mass where q = 0."""
    p = jnp.exp(log_p)
    in_p = log_p > -jnp.inf  # support from log-probs: a probability that underflows still counts
    diff = jnp.where(in_p, log_p - jnp.where(in_p, log_q, 0.0), 0.0)
    # +inf (q = 0 under p) is handled by `escapes`; a NaN input stays NaN (never a silent 0)
    finite = jnp.sum(jnp.where(in_p, p * jnp.where(jnp.isinf(diff), 0.0, diff), 0.0), axis=-1)
    escapes = jnp.any(in_p & (log_q == -jnp.inf), axis=-1)
    return jnp.where(escapes, jnp.inf, finite)


def _renormalise(log_p_k: jax.Array) -> jax.Array:
    return log_p_k - jax.nn.logsumexp(log_p_k, axis=-1, keepdims=True)


def topk_support(logits: jax.Array, k: int = DEFAULT_TOP_K) -> jax.Array:
    """Ids [..., k] of the k largest logits (ties: lower id first); no gradient through the choice."""
    if not 1 <= k <= logits.shape[-1]:
        raise ValueError(f"k must be in [1, {logits.shape[-1]}] (the vocabulary size), got {k}")
    _, ids = jax.lax.top_k(jax.lax.stop_gradient(logits.astype(jnp.float32)), k)
    return ids


def topk_reverse_kl_from_log_probs(
    student_log_probs_k: jax.Array,
    teacher_log_probs_k: jax.Array,
    *,
    renormalize: bool = True,
) -> jax.Array:
    """Reverse KL on a fixed support from full-vocabulary log-probs at those ids ([..., k] -> [...]).

    This is the form the trainer uses with the rollout's stored top-k ids: the student's
    log-probs are recomputed with gradient, the teacher's come from the rollout.
    """
    log_s = student_log_probs_k.astype(jnp.float32)
    log_t = jax.lax.stop_gradient(teacher_log_probs_k.astype(jnp.float32))
    if renormalize:
        return kl_from_log_probs(_renormalise(log_s), _renormalise(log_t))
    return kl_from_log_probs(log_s, log_t)


def topk_reverse_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    k: int = DEFAULT_TOP_K,
    renormalize: bool = True,
) -> jax.Array:
    """KL(pi_theta || pi_T) on the student's top-k support, per token ([..., V] -> [...])."""
    ids = topk_support(student_logits, k)
    log_s = jnp.take_along_axis(_log_softmax32(student_logits), ids, axis=-1)
    log_t = jnp.take_along_axis(_log_softmax32(teacher_logits), ids, axis=-1)
    return topk_reverse_kl_from_log_probs(log_s, log_t, renormalize=renormalize)


def reverse_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Full-vocabulary KL(pi_theta || pi_T) per token ([..., V] -> [...])."""
    return kl_from_log_probs(
        _log_softmax32(student_logits),
        jax.lax.stop_gradient(_log_softmax32(teacher_logits)),
    )


def forward_kl(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Full-vocabulary KL(pi_T || pi_theta) per token ([..., V] -> [...])."""
    return kl_from_log_probs(
        jax.lax.stop_gradient(_log_softmax32(teacher_logits)),
        _log_softmax32(student_logits),
    )


def topk_forward_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    k: int = DEFAULT_TOP_K,
    renormalize: bool = True,
) -> jax.Array:
    """KL(pi_T || pi_theta) on the teacher's top-k support, per token ([..., V] -> [...])."""
    ids = topk_support(teacher_logits, k)
    log_s = jnp.take_along_axis(_log_softmax32(student_logits), ids, axis=-1)
    log_t = jax.lax.stop_gradient(
        jnp.take_along_axis(_log_softmax32(teacher_logits), ids, axis=-1)
    )
    if renormalize:
        return kl_from_log_probs(_renormalise(log_t), _renormalise(log_s))
    return kl_from_log_probs(log_t, log_s)


def k1_estimate(student_log_prob: jax.Array, teacher_log_prob: jax.Array) -> jax.Array:
    """K1 single-sample reverse-KL estimate log pi_theta(a) - log pi_T(a) at the sampled token a.

    Unbiased for KL(pi_theta || pi_T) when a ~ pi_theta. Its value is for logging; train with
    `k1_policy_gradient_loss`, whose gradient is the estimator's.
    """
    return student_log_prob - jax.lax.stop_gradient(teacher_log_prob)


def k1_policy_gradient_loss(student_log_prob: jax.Array, teacher_log_prob: jax.Array) -> jax.Array:
    """Surrogate sg(log pi_theta(a) - log pi_T(a)) * log pi_theta(a), per token.

    With a ~ pi_theta its gradient is unbiased for grad KL(pi_theta || pi_T) at that prefix
    (the score-function form; differentiating k1_estimate directly would average to zero).
    """
    advantage = jax.lax.stop_gradient(student_log_prob - teacher_log_prob)
    return advantage * student_log_prob


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Token mean of x over mask != 0 (all leading dims); 0 when the mask is empty."""
    if x.shape != mask.shape:
        raise ValueError(f"x and mask must have the same shape, got {x.shape} and {mask.shape}")
    m = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(m > 0, x.astype(jnp.float32), 0.0) * m)
    return total / jnp.maximum(jnp.sum(m), 1.0)


def masked_sequence_mean(x_bt: jax.Array, mask_bt: jax.Array) -> jax.Array:
    """Mean over sequences of each sequence's token mean (rows with an empty mask count 0)."""
    if x_bt.shape != mask_bt.shape or x_bt.ndim != 2:
        raise ValueError(
            f"x_bt and mask_bt must both be [B, T], got {x_bt.shape} and {mask_bt.shape}"
        )
    m = mask_bt.astype(jnp.float32)
    per_seq = jnp.sum(jnp.where(m > 0, x_bt.astype(jnp.float32), 0.0) * m, axis=-1)
    per_seq = per_seq / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jnp.mean(per_seq)
