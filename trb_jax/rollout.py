"""Lockstep rollout engine: student and teacher decode together in one jitted `lax.while_loop`.

    rollout(params_s, params_t, prompts, rng_b, knobs, *, student_config, teacher_config, spec)
        -> Rollout

Two jitted programs per (spec, configs, shapes):
  1. `_start`: prefill the student (and the teacher when the behavior needs it) on their own
     left-padded prompts, sample the first response token, build the `DecodeState`.
  2. `_decode`: `lax.while_loop` over `DecodeState` (donated): feed the last token to each model
     as its native id (`stop_to_native`), form the behavior distribution, sample, record, stop
     rows at the merged stop event; exits as soon as every row is done or max_new_tokens.

The behavior is a static name (`spec.behavior`, see trb_jax.behaviors); every per-call number
(eps, tau, SKD K and tau_T, temperature, top-p, teacher prefix length) is a traced `Knobs` leaf.
The `student` program has no teacher prefill, no teacher KV cache and no teacher decode: it is
built without teacher params at all (`params_t=None` works). `select_program` maps an annealed
TRB run onto it once eps reaches 0, and a `teacher_prefix` run with an empty prefix.

Prompt lengths are bucketed (`PROMPT_BUCKETS`, `pad_prompts`), so a run compiles at most
|behaviors used| x |student buckets hit| x |teacher buckets hit| pairs of programs for a fixed
batch size and max_new_tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from trb_jax import sharding
from trb_jax.behaviors import (BEHAVIORS, BLEND_BEHAVIORS, NEEDS_TEACHER, Knobs, make_knobs,
                               process_logits)
from trb_jax.blending import EosMap, merge_eos, stop_to_native
from trb_jax.models import qwen3

__all__ = [
    "PROMPT_BUCKETS",
    "RolloutSpec",
    "Prompts",
    "Rollout",
    "DecodeState",
    "decode_state_shardings",
    "bucket_length",
    "pad_prompts",
    "row_keys",
    "select_program",
    "rollout",
    "make_knobs",
]

# Prompt lengths are padded up to the smallest bucket that fits (powers of two from 16).
PROMPT_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


@dataclasses.dataclass(frozen=True)
class RolloutSpec:
    """Static rollout settings (hashable; a jit static argument).

    behavior: a key of trb_jax.behaviors.BEHAVIORS.
    max_new_tokens: response length cap T (the output buffers are [b, T]).
    eos: the shared stop event of both models (EosMap.from_ids).
    student_eos_id / teacher_eos_id: the native id written into each model's own sequence when
      the stop event is sampled.
    top_k: width of the student's and the teacher's top-k supports recorded per prefix when the
      teacher runs (paper: 16).
    solver: trust-region solver of `trb` / `fixed_eps` ("newton" by default: the same beta as
      the paper's bisection to within tol, in 3-5 instead of 20 evaluations per token).
    """

    behavior: str
    max_new_tokens: int
    eos: EosMap
    student_eos_id: int
    teacher_eos_id: int
    top_k: int = 16
    solver: str = "newton"

    def __post_init__(self):
        if self.behavior not in BEHAVIORS:
            raise ValueError(f"behavior must be one of {sorted(BEHAVIORS)}, got {self.behavior!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @property
    def runs_teacher(self) -> bool:
        return self.behavior in NEEDS_TEACHER


@flax.struct.dataclass
class Prompts:
    """Each model's own left-padded prompt ids and masks (1 = real token); teacher may be None."""

    student_ids_bt: jax.Array
    student_mask_bt: jax.Array
    teacher_ids_bt: jax.Array | None = None
    teacher_mask_bt: jax.Array | None = None


@flax.struct.dataclass
class Rollout:
    """One batch of responses; every [b, T] field is aligned with tokens_bt.

    tokens_bt: int32 response tokens; the stop event is eos.stop_id (canonical); positions after
      a row's stop hold stop_id and are masked out.
    student_tokens_bt / teacher_tokens_bt: the same with the stop written as each model's native
      EOS (what each model was fed).
    response_mask_bt: bool, True for generated tokens up to and including the stop.
    lengths_b: int32 number of response tokens (= response_mask_bt.sum(-1)).
    behavior_logprob_bt: log mu(token) under the processed behavior distribution it was drawn
      from (temperature, top-p, behavior): the importance-sampling denominator.
    student_logprob_bt / teacher_logprob_bt: log pi(token) of each model's EOS-merged
      distribution at temperature 1, no top-p (the distributions the loss uses). Teacher fields
      are NaN when the teacher did not run (`student`, `temperature`).
    beta_bt, kl_bt: the behavior's interpolation weight and KL(mu || processed pi_S).
    teacher_entropy_bt: entropy of the EOS-merged teacher distribution (temperature 1).
    skd_replaced_bt: bool, SKD replaced the student's proposal.
    from_teacher_bt: bool, the token was drawn from a teacher distribution: every response
      position of `teacher`, the first knobs.prefix_tokens of `teacher_prefix`, SKD's
      replacements; False for the blends and student-side behaviors and after the stop.
    topk_ids_btk: int32 [b, T, k] the student's top-k token ids (EOS-merged, temperature 1,
      ties lower id first) at each prefix, with float32 topk_student_logprob_btk /
      topk_teacher_logprob_btk (both models' EOS-merged temperature-1 log-probs) there.
    teacher_topk_ids_btk: int32 [b, T, k] the same for the teacher's top-k, with float32
      teacher_topk_teacher_logprob_btk / teacher_topk_student_logprob_btk there.
      The six top-k fields are None unless the teacher ran (k = spec.top_k); like every [b, T]
      statistic they are meaningful where response_mask_bt is True only.
    num_steps: int32, loop iterations actually run (<= T; fewer when all rows stopped early).
    """

    tokens_bt: jax.Array
    student_tokens_bt: jax.Array
    teacher_tokens_bt: jax.Array
    response_mask_bt: jax.Array
    lengths_b: jax.Array
    behavior_logprob_bt: jax.Array
    student_logprob_bt: jax.Array
    teacher_logprob_bt: jax.Array
    beta_bt: jax.Array
    kl_bt: jax.Array
    teacher_entropy_bt: jax.Array
    skd_replaced_bt: jax.Array
    from_teacher_bt: jax.Array
    topk_ids_btk: jax.Array | None
    topk_student_logprob_btk: jax.Array | None
    topk_teacher_logprob_btk: jax.Array | None
    teacher_topk_ids_btk: jax.Array | None
    teacher_topk_teacher_logprob_btk: jax.Array | None
    teacher_topk_student_logprob_btk: jax.Array | None
    num_steps: jax.Array


@flax.struct.dataclass
class DecodeState:
    """Everything the while_loop carries. The teacher cache is None in the student program.

    step: int32, number of tokens sampled so far (the column the next token is written to).
    done_b: bool, the row has sampled the stop event.
    token_b: int32, last sampled token (canonical ids).
    s_logits_bv / t_logits_bv: float32 raw next-token logits of each model at the current prefix.
    s_cache / t_cache: each model's KV cache (prompt + response so far).
    rng_b: per-row base keys; step keys are fold_in(rng_b[i], step).
    out: the Rollout being filled (tokens / masks / per-token statistics).
    """

    step: jax.Array
    done_b: jax.Array
    token_b: jax.Array
    s_logits_bv: jax.Array
    t_logits_bv: jax.Array | None
    s_cache: qwen3.KVCache
    t_cache: qwen3.KVCache | None
    rng_b: jax.Array
    out: Rollout


def decode_state_shardings(mesh: Mesh, state: DecodeState) -> DecodeState:
    """NamedShardings for a DecodeState (arrays or abstract): both KV caches by
    `qwen3.kv_cache_shardings`, the next-token logits [B, V] by (batch, vocab), every other
    [B, ...] field by rows, scalars replicated."""
    mesh_shape = dict(mesh.shape)

    def logits(x):
        if x is None:
            return None
        spec = sharding.logical_to_spec(("batch", "vocab"), x.shape, mesh_shape)
        return NamedSharding(mesh, spec)

    def cache(c):
        return None if c is None else qwen3.kv_cache_shardings(mesh, c)

    rows = functools.partial(sharding.batch_tree_shardings, mesh)
    return state.replace(
        step=sharding.replicated(mesh),
        done_b=rows(state.done_b),
        token_b=rows(state.token_b),
        s_logits_bv=logits(state.s_logits_bv),
        t_logits_bv=logits(state.t_logits_bv),
        s_cache=cache(state.s_cache),
        t_cache=cache(state.t_cache),
        rng_b=rows(state.rng_b),
        out=rows(state.out),
    )


# ---------------------------------------------------------------------------------------------
# Host-side helpers


def bucket_length(n: int, buckets: Sequence[int] = PROMPT_BUCKETS) -> int:
    """Smallest bucket >= n (prompts longer than the largest bucket are an error)."""
    for b in sorted(buckets):
        if b >= n:
            return b
    raise ValueError(f"prompt length {n} exceeds the largest bucket {max(buckets)}")


def pad_prompts(seqs: Sequence[Sequence[int]], *, pad_id: int = 0,
                buckets: Sequence[int] = PROMPT_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """Left-pads token lists to bucket_length(max length): (ids_bt int32, mask_bt int32)."""
    if any(len(s) == 0 for s in seqs):
        raise ValueError("every prompt needs at least one token")
    t = bucket_length(max(len(s) for s in seqs), buckets)
    ids = np.full((len(seqs), t), pad_id, np.int32)
    mask = np.zeros((len(seqs), t), np.int32)
    for i, s in enumerate(seqs):
        ids[i, t - len(s):] = np.asarray(s, np.int32)
        mask[i, t - len(s):] = 1
    return ids, mask


def row_keys(rng: jax.Array, row_ids: Sequence[int] | jax.Array) -> jax.Array:
    """Per-row keys fold_in(rng, row_id): a row's samples do not depend on its batch-mates."""
    return jax.vmap(jax.random.fold_in, (None, 0))(rng, jnp.asarray(row_ids, jnp.uint32))


def select_program(behavior: str, eps: float | None = None,
                   prefix_tokens: int | None = None) -> str:
    """The behavior whose program should run: an eps-driven blend at eps == 0 and a
    `teacher_prefix` with prefix_tokens == 0 are exactly the student, so they run the student
    program (no teacher prefill, cache or decode; teacher fields NaN / None)."""
    if behavior in ("trb", "fixed_eps") and eps is not None and float(np.max(eps)) == 0.0:
        return "student"
    if behavior == "teacher_prefix" and prefix_tokens is not None and \
            int(np.max(prefix_tokens)) == 0:
        return "student"
    return behavior


# ---------------------------------------------------------------------------------------------
# The jitted programs


def _nan_like(x):
    return jnp.full(x.shape, jnp.nan, jnp.float32)


def _empty_rollout(b: int, spec: RolloutSpec) -> Rollout:
    T = spec.max_new_tokens
    stop = jnp.full((b, T), spec.eos.stop_id, jnp.int32)
    f = jnp.zeros((b, T), jnp.float32)
    no = jnp.zeros((b, T), bool)
    k = jnp.zeros((b, T, spec.top_k)) if spec.runs_teacher else None
    ids = None if k is None else k.astype(jnp.int32)
    return Rollout(
        tokens_bt=stop, student_tokens_bt=stop, teacher_tokens_bt=stop,
        response_mask_bt=no, lengths_b=jnp.zeros((b,), jnp.int32),
        behavior_logprob_bt=f, student_logprob_bt=f, teacher_logprob_bt=f, beta_bt=f, kl_bt=f,
        teacher_entropy_bt=f, skd_replaced_bt=no, from_teacher_bt=no,
        topk_ids_btk=ids, topk_student_logprob_btk=k, topk_teacher_logprob_btk=k,
        teacher_topk_ids_btk=ids, teacher_topk_teacher_logprob_btk=k,
        teacher_topk_student_logprob_btk=k,
        num_steps=jnp.int32(0),
    )  # fmt: skip


def _pick(x_bv, ids_b):
    return jnp.take_along_axis(x_bv, ids_b[:, None], axis=-1)[:, 0]


def _topk_records(merged_bv, log_s_bv, log_t_bv, k: int):
    """(ids_bk, log_s_bk, log_t_bk): the k largest entries of merged_bv (ties lower id first,
    as lax.top_k) and both models' log-probs there."""
    _, ids_bk = jax.lax.top_k(merged_bv, k)
    return (ids_bk, jnp.take_along_axis(log_s_bv, ids_bk, axis=-1),
            jnp.take_along_axis(log_t_bv, ids_bk, axis=-1))


def _sample_and_record(state: DecodeState, s_logits_bv, t_logits_bv, knobs: Knobs,
                       spec: RolloutSpec) -> DecodeState:
    """Behavior step on the current logits; writes column `state.step` of the outputs."""
    eos = spec.eos
    s_merged = merge_eos(s_logits_bv.astype(jnp.float32), eos)
    t_merged = None if t_logits_bv is None else merge_eos(t_logits_bv.astype(jnp.float32), eos)
    s_proc = process_logits(s_merged, knobs)
    t_proc = None if t_merged is None else process_logits(t_merged, knobs)
    keys_b = jax.vmap(jax.random.fold_in, (0, None))(state.rng_b, state.step)
    behavior = BEHAVIORS[spec.behavior]
    if spec.behavior in BLEND_BEHAVIORS:
        behavior = functools.partial(behavior, solver=spec.solver)
    step = behavior(s_proc, t_proc, keys_b, knobs, position=state.step)

    active_b = ~state.done_b
    token_b = jnp.where(active_b, step.token_b, eos.stop_id)
    log_s = jax.nn.log_softmax(s_merged, axis=-1)
    col = state.step
    o = state.out

    def put(buf, val):
        return jax.lax.dynamic_update_index_in_dim(buf, val.astype(buf.dtype), col, axis=1)

    upd = dict(
        tokens_bt=put(o.tokens_bt, token_b),
        response_mask_bt=put(o.response_mask_bt, active_b),
        behavior_logprob_bt=put(o.behavior_logprob_bt, _pick(step.log_mu_bv, token_b)),
        student_logprob_bt=put(o.student_logprob_bt, _pick(log_s, token_b)),
        beta_bt=put(o.beta_bt, step.beta_b),
        kl_bt=put(o.kl_bt, step.kl_b),
        skd_replaced_bt=put(o.skd_replaced_bt, step.replaced_b & active_b),
        from_teacher_bt=put(o.from_teacher_bt, step.from_teacher_b & active_b),
    )
    if t_merged is None:
        upd.update(teacher_logprob_bt=put(o.teacher_logprob_bt, _nan_like(token_b)),
                   teacher_entropy_bt=put(o.teacher_entropy_bt, _nan_like(token_b)))
    else:
        log_t = jax.nn.log_softmax(t_merged, axis=-1)
        p_t = jnp.exp(log_t)
        entropy_b = -jnp.sum(jnp.where(p_t > 0, p_t * log_t, 0.0), axis=-1)
        s_ids, s_at_s, t_at_s = _topk_records(s_merged, log_s, log_t, spec.top_k)
        t_ids, s_at_t, t_at_t = _topk_records(t_merged, log_s, log_t, spec.top_k)
        upd.update(
            teacher_logprob_bt=put(o.teacher_logprob_bt, _pick(log_t, token_b)),
            teacher_entropy_bt=put(o.teacher_entropy_bt, entropy_b),
            topk_ids_btk=put(o.topk_ids_btk, s_ids),
            topk_student_logprob_btk=put(o.topk_student_logprob_btk, s_at_s),
            topk_teacher_logprob_btk=put(o.topk_teacher_logprob_btk, t_at_s),
            teacher_topk_ids_btk=put(o.teacher_topk_ids_btk, t_ids),
            teacher_topk_teacher_logprob_btk=put(o.teacher_topk_teacher_logprob_btk, t_at_t),
            teacher_topk_student_logprob_btk=put(o.teacher_topk_student_logprob_btk, s_at_t),
        )
    upd["num_steps"] = col + 1
    return state.replace(
        step=col + 1,
        done_b=state.done_b | (token_b == eos.stop_id),
        token_b=token_b,
        out=o.replace(**upd),
    )


@functools.partial(jax.jit, static_argnames=("student_config", "teacher_config", "spec"))
def _start(params_s, params_t, prompts: Prompts, rng_b, knobs: Knobs, *,
           student_config, teacher_config, spec: RolloutSpec) -> DecodeState:
    b, ts = prompts.student_ids_bt.shape
    T = spec.max_new_tokens
    # T - 1 decode steps follow the prefill, so prompt + T slots never overflow.
    s_logits, s_cache = qwen3.prefill(params_s, student_config, prompts.student_ids_bt,
                                      prompts.student_mask_bt, ts + T)
    t_logits, t_cache = None, None
    if spec.runs_teacher:
        tt = prompts.teacher_ids_bt.shape[1]
        t_logits, t_cache = qwen3.prefill(params_t, teacher_config, prompts.teacher_ids_bt,
                                          prompts.teacher_mask_bt, tt + T)
    del knobs
    return DecodeState(
        step=jnp.int32(0), done_b=jnp.zeros((b,), bool), token_b=jnp.zeros((b,), jnp.int32),
        s_logits_bv=s_logits, t_logits_bv=t_logits, s_cache=s_cache, t_cache=t_cache,
        rng_b=rng_b, out=_empty_rollout(b, spec),
    )  # fmt: skip


# The state is donated: its KV caches (the teacher's is the largest buffer of a rollout) and
# output buffers are updated in place by the loop, so a rollout holds one copy of them instead
# of an input copy plus an output copy.
@functools.partial(jax.jit, static_argnames=("student_config", "teacher_config", "spec"),
                   donate_argnames=("state",))
def _decode(params_s, params_t, state: DecodeState, knobs: Knobs, *,
            student_config, teacher_config, spec: RolloutSpec) -> DecodeState:
    eos = spec.eos

    def cond(st: DecodeState):
        return (st.step < spec.max_new_tokens) & ~jnp.all(st.done_b)

    def advance(st: DecodeState) -> DecodeState:
        s_logits, s_cache = qwen3.decode_step(
            params_s, student_config, stop_to_native(st.token_b, eos, spec.student_eos_id),
            st.s_cache)
        t_logits, t_cache = st.t_logits_bv, st.t_cache
        if spec.runs_teacher:
            t_logits, t_cache = qwen3.decode_step(
                params_t, teacher_config, stop_to_native(st.token_b, eos, spec.teacher_eos_id),
                st.t_cache)
        return st.replace(s_logits_bv=s_logits, t_logits_bv=t_logits, s_cache=s_cache,
                          t_cache=t_cache)

    def body(st: DecodeState):
        st = _sample_and_record(st, st.s_logits_bv, st.t_logits_bv, knobs, spec)
        # Sample first, then decode only if another token follows: the sampler is compiled
        # once (not again for the prefill logits) and no forward pass is wasted after the last
        # token.
        return jax.lax.cond(cond(st), advance, lambda s: s, st)

    return jax.lax.while_loop(cond, body, state)


def _finish(out: Rollout, spec: RolloutSpec) -> Rollout:
    return out.replace(
        student_tokens_bt=stop_to_native(out.tokens_bt, spec.eos, spec.student_eos_id),
        teacher_tokens_bt=stop_to_native(out.tokens_bt, spec.eos, spec.teacher_eos_id),
        lengths_b=jnp.sum(out.response_mask_bt, axis=-1, dtype=jnp.int32),
    )


def rollout(params_s, params_t, prompts: Prompts, rng_b: jax.Array, knobs: Knobs, *,
            student_config: qwen3.Qwen3Config, teacher_config: qwen3.Qwen3Config | None,
            spec: RolloutSpec) -> Rollout:
    """Samples one response per prompt row with `spec.behavior`.

    Args:
      params_s, params_t: model params; params_t (and prompts' teacher fields, teacher_config)
        may be None when the behavior does not run the teacher.
      prompts: left-padded prompts (use `pad_prompts` so lengths fall into PROMPT_BUCKETS).
      rng_b: [b] per-row keys (`row_keys`), so a row's samples do not depend on the batch.
      knobs: traced per-call scalars (`make_knobs`); new values reuse the compiled programs.

    Returns a `Rollout` ([b, T] outputs, T = spec.max_new_tokens).
    """
    if spec.runs_teacher and (params_t is None or prompts.teacher_ids_bt is None
                              or teacher_config is None):
        raise ValueError(f"behavior {spec.behavior!r} runs the teacher: pass params_t, "
                         "teacher_config and teacher prompts")
    if not spec.runs_teacher:  # keep the student program's signature free of teacher leaves
        params_t, teacher_config = None, None
        prompts = prompts.replace(teacher_ids_bt=None, teacher_mask_bt=None)
    kw = dict(student_config=student_config, teacher_config=teacher_config, spec=spec)
    state = _start(params_s, params_t, prompts, rng_b, knobs, **kw)
    state = _decode(params_s, params_t, state, knobs, **kw)
    return _finish(state.out, spec)


def compiled_program_count() -> int:
    """Programs compiled so far by the rollout's two jitted functions (for recompile checks)."""
    return _start._cache_size() + _decode._cache_size()
