"""Behavior policies: how the rollout picks the next token from the two models' logits.

Each policy is a small pure function chosen by name from `BEHAVIORS`:

    fn(s_logits_bv, t_logits_bv | None, keys_b, knobs, *, position=0) -> BehaviorStep

s_logits_bv / t_logits_bv are the *processed* logits of student and teacher (EOS merged and
divided by the sampling temperature; see `process_logits`); keys_b are per-row PRNG keys for
this step; knobs the traced per-call scalars (`Knobs`); position the traced int32 response
position (column) of the token being drawn, which only position-dependent policies read
(`teacher_prefix`). Policies whose name is not in `NEEDS_TEACHER` get t_logits_bv=None: the
rollout does not run the teacher for them.

Truncation (top-p) applies to the behavior distribution each policy samples from, after the
blend, never to the models' logits before it: truncating each model first would cut the
intersection of the two supports, and where the student's nucleus holds a token outside the
teacher's, KL(mu_beta || pi_S) > 0 already at beta -> 0+, so every budget below that gives
beta* = 0 and TRB silently samples the student. The recorded log mu and KL are those of the
truncated distribution actually sampled. SKD truncates its two sampling distributions (the
student's proposal and the replacement); its top-K test reads the teacher's untruncated
logits.

  student      sample pi_S (vanilla OPD).
  trb          sample mu* = trust_region_blend(pi_S, pi_T, knobs.eps).
  fixed_eps    the same solve; the caller keeps knobs.eps constant over the run.
  skd          the student proposes a ~ pi_S; if a is outside the teacher's top-K it is replaced
               by a sample of softmax(t / tau_T) (K = knobs.skd_k, tau_T = knobs.skd_tau_t).
  temperature  sample softmax(s / knobs.tau).
  teacher      sample pi_T.
  teacher_prefix  sample pi_T at response positions < knobs.prefix_tokens, pi_S after
               (off-policy guidance: the teacher writes the opening, the student continues).

`trb` with eps = 0 and `student` draw the same token from the same key (both sample the
identical log_softmax(s) array); `trb` with a huge eps and `teacher` likewise; `teacher_prefix`
with prefix_tokens = 0 is `student` and with prefix_tokens >= T is `teacher` in the same sense.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from trb_jax.blending import trust_region_blend
from trb_jax.losses import kl_from_log_probs
from trb_jax.sampling import sample_categorical

__all__ = [
    "Knobs",
    "BehaviorStep",
    "BEHAVIORS",
    "NEEDS_TEACHER",
    "BLEND_BEHAVIORS",
    "SKD_MAX_K",
    "make_knobs",
    "process_logits",
    "top_p_mask",
    "truncate",
]

# lax.top_k needs a static k; the traced K of SKD selects a threshold among these many.
SKD_MAX_K = 64


@flax.struct.dataclass
class Knobs:
    """Per-call scalars, all traced arrays: changing a value never recompiles.

    eps: trust-region budget (scalar or [b]) for `trb` / `fixed_eps`.
    tau: student temperature of the `temperature` behavior (> 0).
    skd_k: int32 teacher top-K of `skd` (1 <= K <= SKD_MAX_K).
    skd_tau_t: teacher temperature of the `skd` replacement sample (> 0).
    temperature: sampling temperature applied to *both* models' logits before any behavior (> 0).
    top_p: nucleus mass of the behavior distribution, applied after the blend (1 = off).
    prefix_tokens: int32 number of leading response tokens `teacher_prefix` draws from the
      teacher (scalar or [b]; >= 0).
    """

    eps: jax.Array
    tau: jax.Array
    skd_k: jax.Array
    skd_tau_t: jax.Array
    temperature: jax.Array
    top_p: jax.Array
    prefix_tokens: jax.Array


def _prefix_tokens(prefix_tokens) -> np.ndarray:
    """int32 prefix lengths, validated; values past the int32 range mean "every position"."""
    n = np.asarray(prefix_tokens)
    if not (np.issubdtype(n.dtype, np.integer) or np.all(n == np.floor(n))):
        raise ValueError(f"prefix_tokens must be a whole number, got {prefix_tokens!r}")
    if np.any(n < 0):
        raise ValueError(f"prefix_tokens must be >= 0, got {prefix_tokens!r}")
    return np.minimum(n, np.iinfo(np.int32).max).astype(np.int32)


def make_knobs(eps=0.0, tau=1.0, skd_k=15, skd_tau_t=0.2, temperature=1.0, top_p=1.0,
               prefix_tokens=0) -> Knobs:
    """Knobs with fixed dtypes (float32 / int32, never weak-typed) so one program serves all."""
    f32 = lambda x: jnp.asarray(np.asarray(x, np.float32))  # noqa: E731
    k = int(skd_k)
    if not 1 <= k <= SKD_MAX_K:
        raise ValueError(f"skd_k must be in [1, {SKD_MAX_K}], got {k}")
    return Knobs(eps=f32(eps), tau=f32(tau), skd_k=jnp.asarray(np.int32(k)),
                 skd_tau_t=f32(skd_tau_t), temperature=f32(temperature), top_p=f32(top_p),
                 prefix_tokens=jnp.asarray(_prefix_tokens(prefix_tokens)))


class BehaviorStep(NamedTuple):
    """One sampling step of a behavior policy.

    token_b: int32 sampled token ids.
    log_mu_bv: float32 normalised log of the behavior distribution the token was drawn from
      (for skd the exact marginal of propose-then-replace).
    beta_b: the interpolation weight (trb; 0 for student-like policies, 1 for teacher, NaN skd;
      teacher_prefix 1 inside the prefix, 0 after).
    kl_b: KL(mu || processed pi_S), the realised per-token trust-region cost.
    replaced_b: bool, skd replaced the student's proposal (False for other policies).
    from_teacher_b: bool, the token was drawn from a teacher distribution (`teacher`,
      `teacher_prefix` inside the prefix, skd's replacement; never for a blend).
    """

    token_b: jax.Array
    log_mu_bv: jax.Array
    beta_b: jax.Array
    kl_b: jax.Array
    replaced_b: jax.Array
    from_teacher_b: jax.Array


def top_p_mask(logits_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose mass reaches top_p; others -> -inf.

    A token is kept when the mass of the strictly more likely tokens is < top_p (so the argmax
    always survives). Skipped (no sort) when top_p >= 1.
    """

    def apply(l_bv):
        sorted_bv = jnp.sort(l_bv, axis=-1)[..., ::-1]
        probs_bv = jax.nn.softmax(sorted_bv, axis=-1)
        before_bv = jnp.cumsum(probs_bv, axis=-1) - probs_bv
        n_keep_b = jnp.maximum(jnp.sum(before_bv < top_p, axis=-1), 1)
        thresh_b = jnp.take_along_axis(sorted_bv, (n_keep_b - 1)[:, None], axis=-1)
        return jnp.where(l_bv >= thresh_b, l_bv, -jnp.inf)

    return jax.lax.cond(top_p < 1.0, apply, lambda l_bv: l_bv, logits_bv)


def process_logits(merged_bv: jax.Array, knobs: Knobs) -> jax.Array:
    """EOS-merged logits -> the logits every behavior sees: / temperature (top-p comes after
    the behavior, `truncate`)."""
    return merged_bv / knobs.temperature


def truncate(log_mu_bv: jax.Array, top_p: jax.Array) -> jax.Array:
    """The top-p nucleus of a normalised distribution, renormalised (identity when top_p >= 1)."""
    def apply(l_bv):
        return jax.nn.log_softmax(top_p_mask(l_bv, top_p), axis=-1)

    return jax.lax.cond(top_p < 1.0, apply, lambda l_bv: l_bv, log_mu_bv)


def _truncated_kl(log_mu_bv, kl_b, log_s_fn, top_p):
    """KL(truncated mu || pi_S): kl_b (the untruncated one) when top_p >= 1."""
    return jax.lax.cond(top_p < 1.0, lambda: kl_from_log_probs(log_mu_bv, log_s_fn()),
                        lambda: kl_b)


def _sample(keys_b: jax.Array, log_p_bv: jax.Array) -> jax.Array:
    return sample_categorical(keys_b, log_p_bv)


def _const(value, like_b):
    return jnp.full(like_b.shape, value, jnp.float32)


def student(s_bv, t_bv, keys_b, knobs, *, position=0) -> BehaviorStep:
    del t_bv, position
    log_s = jax.nn.log_softmax(s_bv.astype(jnp.float32), axis=-1)
    log_mu = truncate(log_s, knobs.top_p)
    token = _sample(keys_b, log_mu)
    kl = _truncated_kl(log_mu, _const(0.0, token), lambda: log_s, knobs.top_p)
    return BehaviorStep(token, log_mu, _const(0.0, token), kl, token < 0, token < 0)


def temperature(s_bv, t_bv, keys_b, knobs, *, position=0) -> BehaviorStep:
    del t_bv, position
    s32 = s_bv.astype(jnp.float32)
    log_mu = truncate(jax.nn.log_softmax(s32 / knobs.tau, axis=-1), knobs.top_p)
    token = _sample(keys_b, log_mu)
    kl = kl_from_log_probs(log_mu, jax.nn.log_softmax(s32, axis=-1))
    return BehaviorStep(token, log_mu, _const(0.0, token), kl, token < 0, token < 0)


def teacher(s_bv, t_bv, keys_b, knobs, *, position=0) -> BehaviorStep:
    del position
    log_t = truncate(jax.nn.log_softmax(t_bv.astype(jnp.float32), axis=-1), knobs.top_p)
    token = _sample(keys_b, log_t)
    kl = kl_from_log_probs(log_t, jax.nn.log_softmax(s_bv.astype(jnp.float32), axis=-1))
    return BehaviorStep(token, log_t, _const(1.0, token), kl, token < 0, token >= 0)


def trb(s_bv, t_bv, keys_b, knobs, *, position=0, solver: str = "newton") -> BehaviorStep:
    """Sample mu* of the trust-region blend (its top-p nucleus); `solver` is static (the
    rollout spec's). The solve sees the full distributions."""
    del position
    blend = trust_region_blend(s_bv, t_bv, knobs.eps, solver=solver)
    log_mu = truncate(blend.log_probs, knobs.top_p)
    token = _sample(keys_b, log_mu)
    kl = _truncated_kl(log_mu, blend.kl,
                       lambda: jax.nn.log_softmax(s_bv.astype(jnp.float32), axis=-1), knobs.top_p)
    return BehaviorStep(token, log_mu, blend.beta, kl, token < 0, token < 0)


def skd(s_bv, t_bv, keys_b, knobs, *, position=0) -> BehaviorStep:
    """Propose from pi_S; keep if in the teacher's top-K, else draw from softmax(t / tau_T).

    Top-K membership is `t >= (K-th largest teacher logit)`, so ties at the threshold are all
    in. The marginal behavior distribution is
        mu(a) = pi_S(a) [a in top-K] + pi_S(outside top-K) * q_T(a).
    """
    del position
    s32, t32 = s_bv.astype(jnp.float32), t_bv.astype(jnp.float32)
    log_s_full = jax.nn.log_softmax(s32, axis=-1)
    log_s = truncate(log_s_full, knobs.top_p)  # the proposal
    log_q = truncate(jax.nn.log_softmax(t32 / knobs.skd_tau_t, axis=-1), knobs.top_p)
    top_vals_bk, _ = jax.lax.top_k(t32, min(SKD_MAX_K, t32.shape[-1]))
    k_idx = jnp.clip(knobs.skd_k, 1, top_vals_bk.shape[-1]) - 1
    thresh_b1 = jax.lax.dynamic_slice_in_dim(top_vals_bk, k_idx, 1, axis=-1)
    in_top_bv = (t32 >= thresh_b1) & (t32 > -jnp.inf)

    k_prop = jax.vmap(jax.random.fold_in, (0, None))(keys_b, 0)
    k_repl = jax.vmap(jax.random.fold_in, (0, None))(keys_b, 1)
    proposal = _sample(k_prop, log_s)
    replacement = _sample(k_repl, log_q)
    accept = jnp.take_along_axis(in_top_bv, proposal[:, None], axis=-1)[:, 0]
    token = jnp.where(accept, proposal, replacement)

    log_in = jnp.where(in_top_bv, log_s, -jnp.inf)
    log_out_mass = jax.nn.logsumexp(jnp.where(in_top_bv, -jnp.inf, log_s), axis=-1)
    log_mu = jnp.logaddexp(log_in, log_out_mass[:, None] + log_q)
    kl = kl_from_log_probs(log_mu, log_s_full)
    return BehaviorStep(token, log_mu, _const(jnp.nan, token), kl, ~accept, ~accept)


def teacher_prefix(s_bv, t_bv, keys_b, knobs, *, position=0) -> BehaviorStep:
    """Sample pi_T while position < knobs.prefix_tokens, else pi_S (each truncated to top-p).

    One draw from the selected row's distribution: the sampler sees exactly the array `teacher`
    or `student` would, so the token equals theirs from the same key.
    """
    log_s = jax.nn.log_softmax(s_bv.astype(jnp.float32), axis=-1)
    log_t = jax.nn.log_softmax(t_bv.astype(jnp.float32), axis=-1)
    use_t_b = jnp.broadcast_to(position < knobs.prefix_tokens, log_s.shape[:1])
    # Select before truncating: top-p is row-wise, so one nucleus pass serves both sources.
    log_mu = truncate(jnp.where(use_t_b[:, None], log_t, log_s), knobs.top_p)
    token = _sample(keys_b, log_mu)
    kl = kl_from_log_probs(log_mu, log_s)  # exactly 0 at student positions without top-p
    return BehaviorStep(token, log_mu, use_t_b.astype(jnp.float32), kl, token < 0, use_t_b)


BehaviorFn = Callable[..., BehaviorStep]  # (s_bv, t_bv | None, keys_b, knobs, *, position)

BEHAVIORS: dict[str, BehaviorFn] = {
    "student": student,
    "trb": trb,
    "fixed_eps": trb,  # same solver; "fixed" is a property of the eps schedule, not the step
    "skd": skd,
    "temperature": temperature,
    "teacher": teacher,
    "teacher_prefix": teacher_prefix,
}

NEEDS_TEACHER: frozenset[str] = frozenset({"trb", "fixed_eps", "skd", "teacher",
                                           "teacher_prefix"})
# Behaviors that run the trust-region solve and take the static `solver` option.
BLEND_BEHAVIORS: frozenset[str] = frozenset({"trb", "fixed_eps"})
# Behaviors that may replace the student's proposal (they record skd_replaced_bt).
REPLACING_BEHAVIORS: frozenset[str] = frozenset({"skd"})
