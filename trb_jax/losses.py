"""Per-token distillation divergences over student/teacher log-probabilities.

The primitives the objectives (trb_jax/objectives) are built from. Every function returns a
per-token value with the leading shape of its inputs ([B, T] for a rollout batch);
`masked_mean` reduces over response tokens. Teacher inputs go through `stop_gradient`, so
gradients reach only the student. -inf log-probs (masked vocabularies) are handled without
forming 0 * (-inf).

The OPD loss of the paper is KL(pi_S || pi_T) on the student's top-k support (k = 16):
`topk_reverse_kl_from_log_probs` (from the log-probs at the k ids, what the train step has) or
`topk_reverse_kl` (from logits). TrOPD's outlier term is KL(pi_T || pi_S) on the teacher's
top-k: `topk_forward_kl_from_log_probs`.

`TOPK_SUPPORTS` names the three treatments of the mass outside the k tokens (`support=`):

  renormalized    both distributions renormalised over the k tokens: a proper divergence (>= 0,
                  zero iff the two agree on the support) whose gradient ignores the mass
                  outside. Blind where the other model puts little mass on the k ids: a teacher
                  with 0.1% of its mass on the student's top-k, shaped like the student, gives
                  loss 0 and gradient 0.
  tail_bucket     the k tokens plus one extra outcome holding each model's mass outside them
                  (1 - its mass on the k ids). The KL of this coarse-grained pair is a lower
                  bound on the full-vocabulary KL (log-sum inequality), >= 0, and sees the
                  blind spot (6.9 nats in the example above).
  unrenormalized  the partial sum over the k ids with full-vocabulary probabilities, as some
                  OPD codebases compute it; it can be negative.

All three need only the two models' full-vocabulary log-probs at the k ids, so they work on the
rollout's stored teacher scores as well as on a teacher forward.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "DEFAULT_TOP_K",
    "TOPK_SUPPORTS",
    "kl_from_log_probs",
    "topk_support",
    "topk_reverse_kl",
    "topk_reverse_kl_from_log_probs",
    "topk_forward_kl_from_log_probs",
    "masked_mean",
]

DEFAULT_TOP_K = 16
TOPK_SUPPORTS = ("renormalized", "tail_bucket", "unrenormalized")
# A tail mass below this is taken as this (only the tail bucket's log needs it finite): its
# contribution p log(p/q) is then < 1e-28, and no gradient is NaN when the top-k holds all mass.
_TINY_TAIL = 1e-30


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


def _check_support(support: str) -> None:
    if support not in TOPK_SUPPORTS:
        raise ValueError(f"support must be one of {TOPK_SUPPORTS}, got {support!r}")


def _with_tail(log_p_k: jax.Array) -> jax.Array:
    """[..., k] full-vocabulary log-probs -> [..., k + 1] with log(1 - their mass) appended."""
    mass = jnp.exp(jax.nn.logsumexp(log_p_k, axis=-1, keepdims=True))
    log_tail = jnp.log(jnp.maximum(1.0 - mass, _TINY_TAIL))
    return jnp.concatenate([log_p_k, log_tail], axis=-1)


def _topk_kl(log_p_k: jax.Array, log_q_k: jax.Array, support: str) -> jax.Array:
    """KL(p || q) on k ids from full-vocabulary log-probs there, by `support`."""
    _check_support(support)
    if support == "renormalized":
        return kl_from_log_probs(_renormalise(log_p_k), _renormalise(log_q_k))
    if support == "tail_bucket":
        return kl_from_log_probs(_with_tail(log_p_k), _with_tail(log_q_k))
    return kl_from_log_probs(log_p_k, log_q_k)


def topk_reverse_kl_from_log_probs(
    student_log_probs_k: jax.Array, teacher_log_probs_k: jax.Array, *,
    support: str = "renormalized",
) -> jax.Array:  # fmt: skip
    """KL(pi_S || pi_T) on a fixed support from full-vocabulary log-probs at its ids
    ([..., k] -> [...]); support: one of TOPK_SUPPORTS. The teacher's side gets no gradient.

    This is the form the train step uses (the ids are the student's top-k: the rollout's, or
    chosen per chunk from the student's logits).
    """
    log_s = student_log_probs_k.astype(jnp.float32)
    log_t = jax.lax.stop_gradient(teacher_log_probs_k.astype(jnp.float32))
    return _topk_kl(log_s, log_t, support)


def topk_forward_kl_from_log_probs(
    student_log_probs_k: jax.Array, teacher_log_probs_k: jax.Array, *,
    support: str = "renormalized",
) -> jax.Array:  # fmt: skip
    """KL(pi_T || pi_S) on a fixed support (TrOPD uses the teacher's top-k ids) from
    full-vocabulary log-probs at its ids ([..., k] -> [...]); the teacher's side gets no
    gradient. "unrenormalized" is the partial sum sum_k p_T (log p_T - log p_S)."""
    log_s = student_log_probs_k.astype(jnp.float32)
    log_t = jax.lax.stop_gradient(teacher_log_probs_k.astype(jnp.float32))
    return _topk_kl(log_t, log_s, support)


def topk_reverse_kl(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    k: int = DEFAULT_TOP_K,
    support: str = "renormalized",
) -> jax.Array:
    """KL(pi_S || pi_T) on the student's top-k support, per token ([..., V] -> [...]), from
    logits; support: how the mass outside the k tokens counts (TOPK_SUPPORTS)."""
    ids = topk_support(student_logits, k)
    log_s = jnp.take_along_axis(_log_softmax32(student_logits), ids, axis=-1)
    log_t = jnp.take_along_axis(_log_softmax32(teacher_logits), ids, axis=-1)
    return topk_reverse_kl_from_log_probs(log_s, log_t, support=support)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Token mean of x over mask != 0 (all leading dims); 0 when the mask is empty."""
    if x.shape != mask.shape:
        raise ValueError(f"x and mask must have the same shape, got {x.shape} and {mask.shape}")
    m = mask.astype(jnp.float32)
    total = jnp.sum(jnp.where(m > 0, x.astype(jnp.float32), 0.0) * m)
    return total / jnp.maximum(jnp.sum(m), 1.0)
