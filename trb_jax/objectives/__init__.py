"""Training objectives: one module per family, each a small pure per-token function.

An objective is an `Objective` (below): a function `per_token(terms, config) -> (loss_bt,
diagnostics)` over `TokenTerms` (the student's and teacher's log-probs on the supports it
declares), plus what it needs (supports, teacher, a traced coefficient). The train step reads
the declaration, computes exactly those supports in its chunked LM head, and calls the
function; it never names an objective. The registry maps `objective.name` to the module that
holds the `OBJECTIVE`:

    opd    top-k reverse KL KL(pi_S || pi_T) on the student's top-k (the OPD loss of TRB)
    veto   top-k reverse KL to the bridge q_alpha ∝ sg(pi_S)^(1-alpha) pi_T^alpha
    sft    NLL of the response tokens (no teacher)
    tropd  TrOPD: K1 reverse KL on the trust region, forward KL on the teacher's top-k for
           outliers (docs/objectives.md)

Adding an objective: write `trb_jax/objectives/<name>.py` with an `OBJECTIVE`, add one line to
`_REGISTRY`. docs/architecture.md walks through TrOPD as the example.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable

import flax.struct
import jax

from trb_jax import losses

__all__ = ["SUPPORTS", "Objective", "ObjectiveConfig", "Support", "TokenTerms", "get",
           "names", "OUTLIER_MODES"]

# The supports a per-token function can ask for, in the order the head concatenates them:
#   student_topk  the student's k most likely ids (the rollout's, in stored mode)
#   teacher_topk  the teacher's k most likely ids
#   sampled       the response token itself (m = 1)
SUPPORTS = ("student_topk", "teacher_topk", "sampled")
OUTLIER_MODES = ("mask", "clip")

# name -> module under trb_jax.objectives holding `OBJECTIVE`. One line per objective.
_REGISTRY = {
    "opd": "opd",
    "veto": "veto",
    "sft": "sft",
    "tropd": "tropd",
}


@flax.struct.dataclass
class Support:
    """Log-probs at one support, [B, T, m], EOS-merged and over the full vocabulary.

    log_s: the student's, differentiable w.r.t. the student's parameters.
    log_t: the teacher's (no gradient); NaN where no teacher was scored.
    """

    log_s: jax.Array
    log_t: jax.Array


@flax.struct.dataclass
class TokenTerms:
    """What a per-token function sees: a `Support` for each support it declared (None for the
    others), and `alpha`, the traced coefficient of objectives that declare `needs_alpha`."""

    student_topk: Support | None = None
    teacher_topk: Support | None = None
    sampled: Support | None = None
    alpha: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
    """The objective and its knobs (the config's `objective` section; static, hashable).

    name: a key of the registry (`names()`).
    topk_support: how a top-k KL counts the mass outside its k ids (losses.TOPK_SUPPORTS:
      "renormalized", "tail_bucket", "unrenormalized"); every top-k KL of every objective uses
      it (veto needs a renormalising choice).
    trust_threshold: TrOPD's region test: the sampled token a is in the trust region iff its
      acceptance ratio min(1, pi_T(a) / pi_S(a)) >= trust_threshold, in (0, 1].
    outlier: what an outlier's policy-gradient term becomes: "mask" (advantage 0, Mask
      Outlier) or "clip" (advantage clipped to [-clip_tau, clip_tau], Clip Outlier).
    clip_tau: the clip threshold of outlier="clip", > 0 (in nats of log pi_T - log pi_S).
    outlier_fkl_weight: weight of the forward KL on the teacher's top-k at outlier tokens, >= 0.
    prefix_fkl_weight: weight of the forward-KL imitation term on teacher-prefix tokens (a batch
      with `prefix_mask_bt`, off-policy guidance), >= 0. Applies under every objective: prefix
      tokens get only this term.
    """

    name: str = "opd"
    topk_support: str = "renormalized"
    trust_threshold: float = 0.1
    outlier: str = "mask"
    clip_tau: float = 2.0
    outlier_fkl_weight: float = 1.0
    prefix_fkl_weight: float = 0.001

    def __post_init__(self):
        if self.name not in _REGISTRY:
            raise ValueError(f"objective.name: unknown objective {self.name!r}; choose one of "
                             f"{names()}")
        if self.topk_support not in losses.TOPK_SUPPORTS:
            raise ValueError(f"objective.topk_support: must be one of {losses.TOPK_SUPPORTS}, "
                             f"got {self.topk_support!r}")
        for field in ("trust_threshold", "clip_tau", "outlier_fkl_weight", "prefix_fkl_weight"):
            if not math.isfinite(getattr(self, field)):
                raise ValueError(f"objective.{field}: must be finite, got {getattr(self, field)}")
        if not 0.0 < self.trust_threshold <= 1.0:
            raise ValueError(f"objective.trust_threshold: must be in (0, 1], got "
                             f"{self.trust_threshold}")
        if self.outlier not in OUTLIER_MODES:
            raise ValueError(f"objective.outlier: must be one of {OUTLIER_MODES}, got "
                             f"{self.outlier!r}")
        if not self.clip_tau > 0:
            raise ValueError(f"objective.clip_tau: must be > 0, got {self.clip_tau}")
        if self.outlier_fkl_weight < 0 or self.prefix_fkl_weight < 0:
            raise ValueError("objective.outlier_fkl_weight and objective.prefix_fkl_weight must "
                             f"be >= 0, got {self.outlier_fkl_weight}, {self.prefix_fkl_weight}")
        get(self.name).check(self)


PerToken = Callable[[TokenTerms, ObjectiveConfig], "tuple[jax.Array, dict[str, jax.Array]]"]


@dataclasses.dataclass(frozen=True)
class Objective:
    """One objective's declaration.

    per_token(terms, config) -> (loss_bt [B, T] float32, {name: [B, T] float32}): the loss of
      each response token and per-token diagnostics (the step logs their token means under the
      names in `diagnostics`).
    supports: the SUPPORTS the function reads.
    needs_teacher: the teacher's log-probs are read (stored from the rollout or a forward).
    needs_alpha: `TokenTerms.alpha` is read (a traced float32 scalar from the batch).
    diagnostics: the names of the per-token diagnostics per_token returns.
    check: raises ValueError for an ObjectiveConfig this objective cannot run.
    """

    per_token: PerToken
    supports: tuple[str, ...]
    needs_teacher: bool = True
    needs_alpha: bool = False
    diagnostics: tuple[str, ...] = ()
    check: Callable[[ObjectiveConfig], None] = lambda config: None

    def __post_init__(self):
        unknown = set(self.supports) - set(SUPPORTS)
        if unknown:
            raise ValueError(f"unknown supports {sorted(unknown)}; choose from {SUPPORTS}")


def names() -> list[str]:
    """The registered objective names."""
    return sorted(_REGISTRY)


def get(name: str) -> Objective:
    """The registered objective `name` (imports its module on first use)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown objective {name!r}; choose one of {names()}")
    return importlib.import_module(f"{__name__}.{_REGISTRY[name]}").OBJECTIVE
