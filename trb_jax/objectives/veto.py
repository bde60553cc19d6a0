"""Veto: reverse KL on the student's top-k to the bridge q_alpha ∝ sg(pi_S)^(1-alpha) pi_T^alpha.

alpha is traced (`Batch.target_alpha`), so an annealed alpha does not recompile. alpha = 1 is
the OPD loss with renormalised support (the same operations on the same numbers); alpha = 0 is
exactly 0 (q = sg(pi_S)) with zero gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from trb_jax import losses
from trb_jax.objectives import Objective, ObjectiveConfig, TokenTerms


def _scaled(a: jax.Array, log_p: jax.Array) -> jax.Array:
    """a * log_p with 0 * (-inf) = 0 (a token outside one side's support)."""
    return jnp.where(a == 0, 0.0, a * log_p)


def _renormalise(log_p_k: jax.Array) -> jax.Array:
    return log_p_k - jax.nn.logsumexp(log_p_k, axis=-1, keepdims=True)


def per_token(terms: TokenTerms, config: ObjectiveConfig):
    """KL(pi_S || q_alpha), both renormalised over the student's top-k ids."""
    del config
    a = jnp.asarray(terms.alpha, jnp.float32)
    log_s = terms.student_topk.log_s.astype(jnp.float32)
    log_t = jax.lax.stop_gradient(terms.student_topk.log_t.astype(jnp.float32))
    log_q = _scaled(1.0 - a, jax.lax.stop_gradient(log_s)) + _scaled(a, log_t)
    return losses.kl_from_log_probs(_renormalise(log_s), _renormalise(log_q)), {}


def check(config: ObjectiveConfig) -> None:
    if config.topk_support == "unrenormalized":
        raise ValueError("objective.topk_support: the veto bridge renormalises over the top-k "
                         "support; 'unrenormalized' does not apply")


OBJECTIVE = Objective(per_token, supports=("student_topk",), needs_alpha=True, check=check)
