"""OPD: KL(pi_S || pi_T) on the student's top-k support, per token (the loss TRB keeps)."""

from __future__ import annotations

from trb_jax import losses
from trb_jax.objectives import Objective, ObjectiveConfig, TokenTerms


def per_token(terms: TokenTerms, config: ObjectiveConfig):
    """Reverse KL on the student's top-k ids; `config.topk_support` says how the mass outside
    them counts."""
    top = terms.student_topk
    return losses.topk_reverse_kl_from_log_probs(top.log_s, top.log_t,
                                                 support=config.topk_support), {}


OBJECTIVE = Objective(per_token, supports=("student_topk",))
