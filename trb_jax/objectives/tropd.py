"""TrOPD (Trust Region On-Policy Distillation): a loss-side peer of TRB.

Per sampled token a (from the rollout) with reward R = log pi_T(a) - log pi_S(a) (no gradient):

  region      trust iff the acceptance ratio min(1, pi_T(a) / pi_S(a)) = min(1, exp R) is at
              least `trust_threshold` (speculative decoding's test, with a fixed threshold).
  trust       the K1 reverse-KL objective as a policy gradient: -R * log pi_S(a). Its gradient
              at a ~ pi_S is unbiased for grad KL(pi_S || pi_T) at that prefix.
  outliers    `outlier="mask"`: advantage 0 (Mask Outlier); `"clip"`: advantage clipped to
              [-clip_tau, clip_tau] (Clip Outlier); plus `outlier_fkl_weight` times the forward
              KL KL(pi_T || pi_S) on the teacher's top-k ids (`topk_support` treatment of the
              mass outside them).

The loss value is the surrogate (its gradient is the method's); `k1` logs the K1 estimate
log pi_S(a) - log pi_T(a) of the reverse KL. Choices where the source is silent are in
docs/objectives.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trb_jax import losses
from trb_jax.objectives import Objective, ObjectiveConfig, TokenTerms


def reward(terms: TokenTerms) -> jax.Array:
    """R = log pi_T(a) - log pi_S(a) [B, T], no gradient (-inf where the teacher has pi_T(a) = 0)."""
    s = terms.sampled
    return jax.lax.stop_gradient(s.log_t[..., 0] - s.log_s[..., 0]).astype(jnp.float32)


def in_trust_region(r_bt: jax.Array, threshold: float) -> jax.Array:
    """min(1, exp R) >= threshold, as R >= log threshold (exact, no overflow)."""
    return r_bt >= jnp.log(jnp.float32(threshold))


def outlier_advantage(r_bt: jax.Array, config: ObjectiveConfig) -> jax.Array:
    if config.outlier == "mask":
        return jnp.zeros_like(r_bt)
    return jnp.clip(r_bt, -config.clip_tau, config.clip_tau)


def per_token(terms: TokenTerms, config: ObjectiveConfig):
    r_bt = reward(terms)
    trust_bt = in_trust_region(r_bt, config.trust_threshold)
    advantage_bt = jnp.where(trust_bt, r_bt, outlier_advantage(r_bt, config))
    log_s_a = terms.sampled.log_s[..., 0].astype(jnp.float32)
    # advantage 0 must contribute exactly 0 even where log pi_S(a) is -inf
    pg_bt = jnp.where(advantage_bt == 0, 0.0, -advantage_bt * log_s_a)
    top = terms.teacher_topk
    fkl_bt = losses.topk_forward_kl_from_log_probs(top.log_s, top.log_t,
                                                   support=config.topk_support)
    outlier_bt = ~trust_bt
    loss_bt = pg_bt + jnp.where(outlier_bt, config.outlier_fkl_weight * fkl_bt, 0.0)
    diagnostics = {"trust_share": trust_bt.astype(jnp.float32), "k1": -r_bt,
                   "teacher_topk_fkl": jax.lax.stop_gradient(fkl_bt)}
    return loss_bt, diagnostics


OBJECTIVE = Objective(per_token, supports=("teacher_topk", "sampled"),
                      diagnostics=("trust_share", "k1", "teacher_topk_fkl"))
