"""SFT: the negative log-likelihood of the response tokens (no teacher)."""

from __future__ import annotations

import jax.numpy as jnp

from trb_jax.objectives import Objective, ObjectiveConfig, TokenTerms


def per_token(terms: TokenTerms, config: ObjectiveConfig):
    """-log pi_S(token) (EOS-merged: a stop scores the stop event)."""
    del config
    return -terms.sampled.log_s[..., 0].astype(jnp.float32), {}


OBJECTIVE = Objective(per_token, supports=("sampled",), needs_teacher=False)
