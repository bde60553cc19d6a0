"""The train step: student forward chunked over the response, a per-token objective, AdamW.

`train_step(state, batch, teacher_params=None, *, config) -> (state, metrics)` is pure and jits
once per (config, shapes, mode). The objective (`config.objective`, trb_jax.objectives) declares
the supports it reads (the student's top-k ids, the teacher's top-k ids, the sampled token) and
whether it needs the teacher; the step computes exactly those and knows no objective by name.
Two teacher modes, chosen by what the batch carries:

* stored (the teacher ran inside the rollout: TRB warmup and other blended behaviors): the
  rollout's teacher scores at each declared support (`STORED_FIELDS`), so no teacher forward
  runs here;
* teacher (pure student rollouts): the teacher scores the batch in one batched forward, outside
  the gradient; top-k ids are chosen per chunk from the logits.

Layout (every row): `[left-padded prompt | response window of T columns]`. The response window
is the rollout's T = max_new_tokens columns, so response token j sits at column P + j of the
student sequence (P = its prompt width) and at column P' + j of the teacher's (P' = the
teacher's prompt width; its template may differ). The prediction for column c is read at
column c - 1, so both models' predictions for response token j are their hidden states at
P - 1 + j and P' - 1 + j: the alignment needs only the widths, no per-row offsets. `_bt`
names below are response-window aligned [B, T]; full sequences are `_bs` [B, S = P + T].

Teacher-prefix tokens (`Batch.prefix_mask_bt`, off-policy guidance) get a forward-KL imitation
term on the teacher's top-k instead of the objective.

Memory: logits exist one [B, chunk, V] chunk at a time. Hidden states [B, T, D] are computed
once per model. `score_response` maps over T-chunks without gradient (unembed -> EOS merge ->
log_softmax -> support ids, log-probs there, logsumexp, metrics); `response_log_probs` gives the
student's log-probs at the support their gradient through a custom VJP whose backward loops over
(T-chunk, V-slice) tiles, recomputing one tile of logits at a time and writing the head's weight
gradient slice by slice into one loop-carried buffer (which XLA updates in place). Loss + grad
then needs W, dW and O(B * chunk * V_slice) temporaries, not a second dW accumulator.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from trb_jax import losses, objectives, sharding
from trb_jax.blending import EosMap, merge_eos
from trb_jax.models import qwen3
# Re-exported: callers know the optimizer as ts.OptimConfig / ts.make_optimizer / ts.make_schedule.
from trb_jax.optim import OptimConfig, make_optimizer, make_schedule  # noqa: F401

Params = Any


# ---------------------------------------------------------------------------------------------
# Configuration, state, batch


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of the step (hashable: the jit static argument).

    teacher: the teacher's architecture; only the teacher mode needs it.
    objective: the per-token objective and its knobs (trb_jax.objectives; "opd" by default);
      the step computes the supports it declares and nothing else.
    chunk_size: response positions per logits chunk (the last chunk is padded and masked).
    eos: the rollout's EosMap; both models' logits are EOS-merged before the log-softmax, as
      the rollout did when it recorded the top-k ids and teacher log-probs. None: no merge.
    remat_layers: checkpoint each decoder layer of the student forward (long sequences).
    vocab_chunk_size: vocabulary columns per tile of the LM head's backward pass.
    microbatch_rows: rows per micro-batch (0: the whole batch at once). One update over B rows
      runs B / microbatch_rows forward+backward passes in a `lax.scan` (the teacher forward
      too) and sums their float32 gradients: the same update, with activation memory set by
      the micro-batch. Must divide B; on a mesh, keep it a multiple of data x fsdp.

    Dtype policy (mixed precision): the student's params are stored in
    `student.param_dtype` (float32 master weights, AdamW moments in the same dtype) and cast to
    `student.compute_dtype` (bfloat16) at use inside the step; logits come out of the LM head
    in float32 (`preferred_element_type`), and the head's gradient is accumulated in float32.
    """

    student: qwen3.Qwen3Config
    teacher: qwen3.Qwen3Config | None = None
    optim: OptimConfig = OptimConfig()
    top_k: int = losses.DEFAULT_TOP_K
    chunk_size: int = 256
    eos: EosMap | None = None
    remat_layers: bool = False
    objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig()
    vocab_chunk_size: int = 8192
    microbatch_rows: int = 0

    @property
    def objective_spec(self) -> objectives.Objective:
        """The declaration of `objective.name` (its supports and needs)."""
        return objectives.get(self.objective.name)

    def __post_init__(self):
        if not isinstance(self.objective, objectives.ObjectiveConfig):
            raise ValueError(f"objective must be an objectives.ObjectiveConfig, got "
                             f"{type(self.objective).__name__}")
        if self.vocab_chunk_size <= 0:
            raise ValueError(f"vocab_chunk_size must be positive, got {self.vocab_chunk_size}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of positions, got {self.chunk_size}")
        if self.microbatch_rows < 0:
            raise ValueError(f"microbatch_rows must be >= 0 (0: no micro-batching), got {self.microbatch_rows}")
        if not 1 <= self.top_k <= self.student.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.student.vocab_size}], got {self.top_k}")
        if self.teacher is not None and self.teacher.vocab_size != self.student.vocab_size:
            raise ValueError(
                f"student and teacher must share the vocabulary: vocab_size "
                f"{self.student.vocab_size} vs {self.teacher.vocab_size}"
            )


@flax.struct.dataclass
class TrainState:
    """Everything a step updates (and a checkpoint saves). The frozen teacher is not state."""

    params: Params
    opt_state: optax.OptState
    step: jax.Array  # int32 []
    rng: jax.Array  # a typed PRNG key; advanced once per step


# Stored mode: the Batch fields that carry the rollout's teacher scores for each support.
STORED_FIELDS = {
    "student_topk": ("topk_ids_btk", "topk_teacher_logprob_btk"),
    "teacher_topk": ("teacher_topk_ids_btk", "teacher_topk_logprob_btk"),
    "sampled": ("sampled_teacher_logprob_bt",),
}


@flax.struct.dataclass
class Batch:
    """One training batch (see the module docstring for the layout).

    input_ids_bs / attention_mask_bs: the student's [prompt | response] ids and mask [B, S].
    response_mask_bt: [B, T] bool, response tokens whose prediction counts (the rollout's
      response_mask_bt); T is the response window, the last T columns of input_ids_bs.
    Stored mode (the teacher ran in the rollout), the fields of the supports the objective
      declares (`STORED_FIELDS`):
      topk_ids_btk / topk_teacher_logprob_btk: [B, T, k] the student's top-k ids and the
        teacher's log-probs there;
      teacher_topk_ids_btk / teacher_topk_logprob_btk: [B, T, k] the teacher's top-k ids and
        its log-probs there;
      sampled_teacher_logprob_bt: [B, T] the teacher's log-prob of each response token.
    teacher_input_ids_bs / teacher_attention_mask_bs: [B, S'] the teacher's own
      [prompt | same response] sequence (teacher mode); its last T columns are the response.
    target_alpha: float32 [] the coefficient of objectives that declare needs_alpha (veto's
      bridge; traced, so an annealed alpha does not recompile). Ignored by the others.
    prefix_mask_bt: [B, T] bool, response tokens the teacher generated (off-policy guidance):
      they get only the forward-KL imitation term (objective.prefix_fkl_weight); None: none.
    """

    input_ids_bs: jax.Array
    attention_mask_bs: jax.Array
    response_mask_bt: jax.Array
    topk_ids_btk: jax.Array | None = None
    topk_teacher_logprob_btk: jax.Array | None = None
    teacher_input_ids_bs: jax.Array | None = None
    teacher_attention_mask_bs: jax.Array | None = None
    target_alpha: jax.Array | None = None
    teacher_topk_ids_btk: jax.Array | None = None
    teacher_topk_logprob_btk: jax.Array | None = None
    sampled_teacher_logprob_bt: jax.Array | None = None
    prefix_mask_bt: jax.Array | None = None

    @property
    def uses_stored_teacher(self) -> bool:
        return any(getattr(self, name) is not None
                   for names in STORED_FIELDS.values() for name in names)

    @property
    def uses_teacher_sequence(self) -> bool:
        return self.teacher_input_ids_bs is not None or self.teacher_attention_mask_bs is not None


def step_supports(config: TrainConfig, batch: Batch) -> tuple[str, ...]:
    """The supports one step computes, in objectives.SUPPORTS order: the objective's, plus the
    teacher's top-k when the batch carries teacher-prefix tokens (their imitation term)."""
    need = set(config.objective_spec.supports)
    if batch.prefix_mask_bt is not None:
        need.add("teacher_topk")
    return tuple(s for s in objectives.SUPPORTS if s in need)


def step_needs_teacher(config: TrainConfig, batch: Batch) -> bool:
    """Whether the step reads teacher log-probs (stored or from a teacher forward)."""
    return config.objective_spec.needs_teacher or batch.prefix_mask_bt is not None


def init_train_state(params: Params, config: TrainConfig, rng: jax.Array) -> TrainState:
    """Fresh optimizer state around `params` (jit it with out_shardings for sharded init)."""
    tx, _ = make_optimizer(config.optim)
    return TrainState(params=params, opt_state=tx.init(params), step=jnp.zeros((), jnp.int32), rng=rng)


# ---------------------------------------------------------------------------------------------
# Validation (shapes are static: this runs once per trace, and eagerly in `check_batch`)


def check_batch(batch: Batch, config: TrainConfig, teacher_params: Params | None = None) -> None:
    """Raises ValueError naming the first inconsistency between batch, mode and config."""
    ids = batch.input_ids_bs
    if ids.ndim != 2:
        raise ValueError(f"input_ids_bs must be [B, S], got shape {ids.shape}")
    b, s = ids.shape
    if batch.attention_mask_bs.shape != ids.shape:
        raise ValueError(
            f"attention_mask_bs shape {batch.attention_mask_bs.shape} != input_ids_bs shape {ids.shape}"
        )
    mask = batch.response_mask_bt
    if mask.ndim != 2 or mask.shape[0] != b:
        raise ValueError(f"response_mask_bt must be [B={b}, T], got shape {mask.shape}")
    t = mask.shape[1]
    if not 1 <= t < s:
        raise ValueError(
            f"response window T={t} must be >= 1 and shorter than the sequence S={s} "
            "(at least one prompt token precedes the response)"
        )
    name = config.objective.name
    if batch.prefix_mask_bt is not None and batch.prefix_mask_bt.shape != (b, t):
        raise ValueError(f"prefix_mask_bt must be [B, T] = {(b, t)}, got {batch.prefix_mask_bt.shape}")
    if config.objective_spec.needs_alpha:
        alpha = batch.target_alpha
        if alpha is None or jnp.shape(alpha) != () or not jnp.issubdtype(jnp.result_type(alpha), jnp.floating):
            got = None if alpha is None else f"shape {jnp.shape(alpha)} dtype {jnp.result_type(alpha)}"
            raise ValueError(
                f"objective {name!r} needs Batch.target_alpha, a float32 [] scalar (the bridge "
                f"coefficient, traced), got {got}"
            )
    stored, scored = batch.uses_stored_teacher, batch.uses_teacher_sequence
    if not step_needs_teacher(config, batch):
        if stored or scored:
            raise ValueError(
                f"objective {name!r} uses no teacher: the batch must carry neither the stored "
                "teacher scores (topk_*, teacher_topk_*, sampled_teacher_*) nor the teacher's "
                "sequence (teacher_*)"
            )
        return
    if stored == scored:
        raise ValueError(
            "a batch carries either the rollout's stored teacher scores (topk_ids_btk, "
            "topk_teacher_logprob_btk, ...) or the teacher's own sequence (teacher_input_ids_bs, "
            "teacher_attention_mask_bs), exactly one of the two"
        )
    if stored:
        for support in step_supports(config, batch):
            for field in STORED_FIELDS[support]:
                x = getattr(batch, field)
                want = (b, t) if field.endswith("_bt") else (b, t, config.top_k)
                if x is None or x.shape != want:
                    got = None if x is None else x.shape
                    raise ValueError(
                        f"objective {name!r} reads the {support} support: stored mode needs "
                        f"Batch.{field} of shape {want}, got {got}")
        return
    if config.teacher is None or teacher_params is None:
        raise ValueError("teacher mode needs config.teacher and teacher_params")
    tids, tmask = batch.teacher_input_ids_bs, batch.teacher_attention_mask_bs
    if tids is None or tmask is None or tids.shape != tmask.shape:
        raise ValueError(
            "teacher_input_ids_bs and teacher_attention_mask_bs must both be given with one shape"
        )
    if tids.ndim != 2 or tids.shape[0] != b or tids.shape[1] <= t:
        raise ValueError(
            f"teacher sequence must be [B={b}, S' > T={t}] (prompt, then the same response), "
            f"got shape {tids.shape}"
        )


# ---------------------------------------------------------------------------------------------
# Model pieces


# Final-layer hidden states [B, S, D] before the final norm, re-exported from the model module.
hidden_states = qwen3.hidden_states


def response_hidden(x_bsd: jax.Array, t: int) -> jax.Array:
    """Hidden states [B, T, D] that predict the last T columns (shift by one: column c - 1 -> c)."""
    s = x_bsd.shape[1]
    return x_bsd[:, s - t - 1 : s - 1]


# ---------------------------------------------------------------------------------------------
# The chunked loss


def _log_probs(logits_bcv: jax.Array, eos: EosMap | None) -> jax.Array:
    if eos is not None:
        logits_bcv = merge_eos(logits_bcv, eos)
    return jax.nn.log_softmax(logits_bcv.astype(jnp.float32), axis=-1)


def _chunks(x: jax.Array, chunk: int, n: int) -> jax.Array:
    """[B, T, ...] -> [n, B, chunk, ...], zero-padding T up to n * chunk."""
    b, t = x.shape[:2]
    pad = [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad)
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)


def _unchunk(x_nbc: jax.Array, t: int) -> jax.Array:
    n, b, c = x_nbc.shape[:3]
    return jnp.moveaxis(x_nbc, 0, 1).reshape(b, n * c, *x_nbc.shape[3:])[:, :t]


# ---------------------------------------------------------------------------------------------
# The LM head with a memory-lean backward pass


@flax.struct.dataclass
class LinearHead:
    """logits = rms_norm(x; norm_d) @ W in float32, as `qwen3.unembed` (norm_d None: no norm).

    w: [D, V], or [V, D] with vocab_major=True (a tied embedding).
    """

    w: jax.Array
    norm_d: jax.Array | None = None
    vocab_major: bool = flax.struct.field(pytree_node=False, default=False)
    norm_eps: float = flax.struct.field(pytree_node=False, default=1e-6)

    @property
    def vocab_size(self) -> int:
        return self.w.shape[0 if self.vocab_major else 1]

    @property
    def vocab_axis(self) -> int:
        return 0 if self.vocab_major else 1

    def normed(self, x_bcd: jax.Array) -> jax.Array:
        return x_bcd if self.norm_d is None else qwen3.rms_norm(x_bcd, self.norm_d, self.norm_eps)

    def logits_from_normed(self, xn_bcd: jax.Array, w: jax.Array | None = None) -> jax.Array:
        """float32 logits [B, C, V'] for the columns in w (default: all of W)."""
        w = self.w if w is None else w
        eq = "bcd,vd->bcv" if self.vocab_major else "bcd,dv->bcv"
        # float32 straight out of the dot: rounding bf16 logits first would quantise them in
        # steps of 0.125 at |z| in [16, 32) (and with them the blend's r = t - s).
        return jnp.einsum(eq, xn_bcd, w.astype(xn_bcd.dtype), preferred_element_type=jnp.float32)

    def __call__(self, x_bcd: jax.Array) -> jax.Array:
        return self.logits_from_normed(self.normed(x_bcd))


def lm_head(params: Params, config: qwen3.Qwen3Config) -> LinearHead:
    """The model's final norm + LM head (tied: the embedding, vocab-major) as a LinearHead."""
    if config.tie_word_embeddings:
        return LinearHead(params["embed_vd"], params["final_norm_d"], True, config.rms_norm_eps)
    return LinearHead(params["lm_head_dv"], params["final_norm_d"], False, config.rms_norm_eps)


def _stop_ids(tokens: jax.Array, eos: EosMap | None) -> jax.Array:
    """Any native EOS id -> the merged stop slot (where the EOS-merged log-probs keep it)."""
    if eos is None:
        return tokens
    return jnp.where(jnp.isin(tokens, jnp.asarray(eos.eos_ids, tokens.dtype)), eos.stop_id, tokens)


def _entropy(log_p_bcv: jax.Array) -> jax.Array:
    return -jnp.sum(jnp.exp(log_p_bcv) * jnp.where(jnp.isfinite(log_p_bcv), log_p_bcv, 0.0), axis=-1)


def support_widths(supports: tuple[str, ...], top_k: int) -> dict[str, int]:
    """Columns each support takes in the concatenated `ids_btm` (top-k supports k, sampled 1)."""
    return {s: (1 if s == "sampled" else top_k) for s in supports}


def score_response(
    student: LinearHead,
    x_btd: jax.Array,
    tokens_bt: jax.Array,
    *,
    supports: tuple[str, ...],
    chunk_size: int,
    top_k: int = losses.DEFAULT_TOP_K,
    eos: EosMap | None = None,
    stored: dict[str, jax.Array] | None = None,
    teacher: LinearHead | None = None,
    teacher_x_btd: jax.Array | None = None,
) -> dict[str, jax.Array]:
    """Everything the objectives and metrics need from the logits, one [B, chunk, V] chunk at
    a time.

    No gradient flows through it (`response_log_probs` attaches the student's). tokens_bt: the
    response tokens (student-side ids; any native EOS scores the merged stop event).
    supports: objectives.SUPPORTS names, in that order; their ids are concatenated along the
    last axis (widths: `support_widths`). Teacher log-probs come `stored` (Batch fields named
    in STORED_FIELDS: a stored top-k support uses the stored ids), or from `teacher` at
    `teacher_x_btd` (the student's / teacher's top-k chosen per chunk, ties lower id first), or
    not at all (NaN). Returns [B, T, ...]:
      ids_btm, log_s_btm (student log-probs at the supports), log_t_btm (teacher's there),
      lse_bt / eos_lse_bt (logsumexp of the raw student logits over the vocabulary / over
      eos.eos_ids: the backward pass's softmax), student_topk_mass_bt, student_entropy_bt,
      student_logprob_bt, teacher_logprob_bt, teacher_entropy_bt.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    if not supports or list(supports) != [s for s in objectives.SUPPORTS if s in supports]:
        raise ValueError(f"supports must be a non-empty ordered subset of {objectives.SUPPORTS}, "
                         f"got {supports}")
    stored = stored or {}
    if stored and teacher is not None:
        raise ValueError("give either the stored teacher scores or a teacher head")
    if teacher is not None and teacher_x_btd is None:
        raise ValueError("a teacher head needs teacher_x_btd")
    student, x_btd = jax.lax.stop_gradient((student, x_btd))
    b, t = x_btd.shape[:2]
    chunk = min(chunk_size, t)
    n = -(-t // chunk)
    xs = {"x": x_btd, "tok": _stop_ids(tokens_bt, eos)}
    xs.update({key: (v.astype(jnp.float32) if "logprob" in key else v)
               for key, v in stored.items() if v is not None})
    if teacher is not None:
        teacher, xs["xt"] = jax.lax.stop_gradient((teacher, teacher_x_btd))
    xs = {key: _chunks(value, chunk, n) for key, value in xs.items()}

    def one_chunk(c):
        z_bcv = student(c["x"])
        log_s_bcv = _log_probs(z_bcv, eos)
        tok_bc1 = c["tok"][..., None]
        log_t_bcv = _log_probs(teacher(c["xt"]), eos) if teacher is not None else None
        nan_bc = jnp.full(tok_bc1.shape[:2], jnp.nan, jnp.float32)
        if "topk_ids_btk" in c:  # the stored student top-k: no top_k over V needed
            top_ids = None
        else:
            top_bck, top_ids = jax.lax.top_k(log_s_bcv, top_k)  # ties: lower id first
            mass_bc = jnp.sum(jnp.exp(top_bck), axis=-1)
        ids, log_t = [], []
        for support in supports:
            if support == "sampled":
                ids.append(tok_bc1)
                if "sampled_teacher_logprob_bt" in c:
                    log_t.append(c["sampled_teacher_logprob_bt"][..., None])
                    continue
            elif "topk_ids_btk" in c and support == "student_topk":
                ids.append(c["topk_ids_btk"])
                log_t.append(c["topk_teacher_logprob_btk"])
                continue
            elif "teacher_topk_ids_btk" in c and support == "teacher_topk":
                ids.append(c["teacher_topk_ids_btk"])
                log_t.append(c["teacher_topk_logprob_btk"])
                continue
            elif support == "student_topk":
                ids.append(top_ids)
            else:  # the teacher's top-k from its forward
                if log_t_bcv is None:
                    raise ValueError("the teacher_topk support needs the teacher (stored or a head)")
                ids.append(jax.lax.top_k(log_t_bcv, top_k)[1])
            log_t.append(jnp.take_along_axis(log_t_bcv, ids[-1], axis=-1) if log_t_bcv is not None
                         else jnp.full(ids[-1].shape, jnp.nan, jnp.float32))
        if top_ids is None:  # the student's mass on its stored top-k ids
            mass_bc = jnp.sum(jnp.exp(jnp.take_along_axis(log_s_bcv, c["topk_ids_btk"], -1)), axis=-1)
        ids_bcm = jnp.concatenate(ids, axis=-1)
        out = {
            "ids_btm": ids_bcm,
            "log_s_btm": jnp.take_along_axis(log_s_bcv, ids_bcm, axis=-1),
            "log_t_btm": jnp.concatenate(log_t, axis=-1),
            "lse_bt": jax.nn.logsumexp(z_bcv, axis=-1),
            "eos_lse_bt": (jax.nn.logsumexp(z_bcv[..., jnp.asarray(eos.eos_ids)], axis=-1)
                           if eos is not None else jnp.zeros_like(nan_bc)),  # fmt: skip
            "student_topk_mass_bt": mass_bc,
            "student_entropy_bt": _entropy(log_s_bcv),
            "student_logprob_bt": jnp.take_along_axis(log_s_bcv, tok_bc1, axis=-1)[..., 0],
            "teacher_logprob_bt": nan_bc,
            "teacher_entropy_bt": nan_bc,
        }
        if log_t_bcv is not None:
            out["teacher_logprob_bt"] = jnp.take_along_axis(log_t_bcv, tok_bc1, axis=-1)[..., 0]
            out["teacher_entropy_bt"] = _entropy(log_t_bcv)
        return out

    return {key: _unchunk(value, t) for key, value in jax.lax.map(one_chunk, xs).items()}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _log_probs_at(chunk, vocab_chunk, eos, head, x_btd, ids_btm, log_s_btm, lse_bt, eos_lse_bt):
    """Returns log_s_btm (computed by `score_response`) with the gradient of
    log_softmax(merge_eos(head(x)))[ids] w.r.t. head and x."""
    del chunk, vocab_chunk, eos, head, x_btd, ids_btm, lse_bt, eos_lse_bt
    return log_s_btm


def _log_probs_at_fwd(chunk, vocab_chunk, eos, head, x_btd, ids_btm, log_s_btm, lse_bt, eos_lse_bt):
    return log_s_btm, (head, x_btd, ids_btm, lse_bt, eos_lse_bt)


def _log_probs_at_bwd(chunk, vocab_chunk, eos, residuals, g_btm):
    """d/dz of log p(a) = [a] - softmax(z): the cotangent of the logits z is sparse (at the ids,
    and with EOS merging at every native EOS id e, weighted exp(z_e - eos_lse)) minus the dense
    softmax term sum_j g_j * p. Tiles of [B, chunk, vocab_chunk] logits are recomputed; dW's
    slices are read, added to and written back in one loop carry, which XLA updates in place."""
    head, x_btd, ids_btm, lse_bt, eos_lse_bt = residuals
    b, t, d = x_btd.shape
    v, v_axis = head.vocab_size, head.vocab_axis
    vc = min(vocab_chunk, v)
    n_v = -(-v // vc)
    c = min(chunk, t)
    n = -(-t // c)
    xn_btd, norm_vjp = jax.vjp(lambda x, nd: head.replace(norm_d=nd).normed(x), x_btd, head.norm_d)
    g_btm = g_btm.astype(jnp.float32)
    total_bt = jnp.sum(g_btm, axis=-1)
    sparse_ids, sparse_g = ids_btm, g_btm
    if eos is not None:
        if eos.stop_id not in eos.eos_ids:
            raise ValueError(f"EosMap.stop_id {eos.stop_id} must be one of its eos_ids {eos.eos_ids}")
        e_ids = jnp.asarray(eos.eos_ids, ids_btm.dtype)
        # A non-stop native EOS slot is a constant -inf after the merge: no gradient.
        sparse_g = jnp.where(jnp.isin(ids_btm, e_ids), 0.0, g_btm)
        stop_g_bt = jnp.sum(jnp.where(ids_btm == eos.stop_id, g_btm, 0.0), axis=-1)
        z_bte = head.logits_from_normed(xn_btd, jnp.take(head.w, e_ids, axis=v_axis))
        e_weight_bte = jnp.exp(z_bte - eos_lse_bt[..., None])
        sparse_ids = jnp.concatenate([ids_btm, jnp.broadcast_to(e_ids, (b, t, len(eos.eos_ids)))], -1)
        sparse_g = jnp.concatenate([sparse_g, stop_g_bt[..., None] * e_weight_bte], -1)
    pad = lambda a: jnp.pad(a, [(0, 0), (0, n * c - t)] + [(0, 0)] * (a.ndim - 2))
    xn_p, total_p, lse_p, ids_p, sg_p = map(pad, (xn_btd, total_bt, lse_bt, sparse_ids, sparse_g))
    bi = jnp.arange(b)[:, None, None]
    ci = jnp.arange(c)[None, :, None]
    dw_eq, dx_eq = ("bcd,bcv->vd", "bcv,vd->bcd") if head.vocab_major else ("bcd,bcv->dv", "bcv,dv->bcd")

    def t_body(i, carry):
        dw, dxn = carry
        xn_c, tot_c, lse_c, sid_c, sg_c = (
            jax.lax.dynamic_slice_in_dim(a, i * c, c, axis=1) for a in (xn_p, total_p, lse_p, ids_p, sg_p)
        )  # fmt: skip

        def v_body(j, inner):
            dw, dxn_c = inner
            lo = j * vc  # columns [lo, lo + vc) are this slice's; the last one is shifted left
            start = jnp.minimum(lo, v - vc)
            w_s = jax.lax.dynamic_slice_in_dim(head.w, start, vc, axis=v_axis)
            z_bcv = head.logits_from_normed(xn_c, w_s)
            fresh_v = start + jnp.arange(vc) >= lo  # not yet done by the previous slice
            gz_bcv = jnp.where(fresh_v, -tot_c[..., None] * jnp.exp(z_bcv - lse_c[..., None]), 0.0)
            local = sid_c - start
            local = jnp.where((sid_c >= lo) & (local < vc), local, vc)  # vc: dropped
            gz_bcv = gz_bcv.at[bi, ci, local].add(sg_c, mode="drop")
            dw_s = jnp.einsum(dw_eq, xn_c.astype(jnp.float32), gz_bcv)
            old = jax.lax.dynamic_slice_in_dim(dw, start, vc, axis=v_axis)
            dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dw_s, start, axis=v_axis)
            return dw, dxn_c + jnp.einsum(dx_eq, gz_bcv, w_s.astype(jnp.float32))

        dw, dxn_c = jax.lax.fori_loop(0, n_v, v_body, (dw, jnp.zeros((b, c, d), jnp.float32)))
        return dw, jax.lax.dynamic_update_slice_in_dim(dxn, dxn_c, i * c, axis=1)

    # dW is accumulated over the T-chunks in float32 whatever W's dtype (a bf16 accumulator
    # would drop every chunk's contribution below its spacing), and cast once at the end.
    dw, dxn = jax.lax.fori_loop(
        0, n, t_body, (jnp.zeros(head.w.shape, jnp.float32), jnp.zeros((b, n * c, d), jnp.float32))
    )
    dx_btd, dnorm_d = norm_vjp(dxn[:, :t].astype(xn_btd.dtype))
    return head.replace(w=dw.astype(head.w.dtype), norm_d=dnorm_d), dx_btd, None, None, None, None


_log_probs_at.defvjp(_log_probs_at_fwd, _log_probs_at_bwd)


def response_log_probs(
    head: LinearHead, x_btd: jax.Array, scores: dict[str, jax.Array], *, chunk_size: int,
    vocab_chunk_size: int = 8192, eos: EosMap | None = None,
) -> jax.Array:  # fmt: skip
    """The student's EOS-merged log-probs at `scores["ids_btm"]` [B, T, m], differentiable
    w.r.t. head and x_btd. The values are `scores["log_s_btm"]` (from `score_response` on the
    same head and x); the backward pass recomputes [B, chunk_size, vocab_chunk_size] logits
    tiles and never holds [B, T, V] nor a second dW."""
    return _log_probs_at(
        chunk_size, vocab_chunk_size, eos, head, x_btd, scores["ids_btm"], scores["log_s_btm"],
        scores["lse_bt"], scores["eos_lse_bt"],
    )  # fmt: skip


def token_terms(supports: tuple[str, ...], top_k: int, log_s_btm: jax.Array,
                log_t_btm: jax.Array, alpha: jax.Array | None = None) -> objectives.TokenTerms:
    """Splits the concatenated support columns into one `objectives.Support` per support."""
    parts, start = {}, 0
    for support, width in support_widths(supports, top_k).items():
        parts[support] = objectives.Support(log_s=log_s_btm[..., start:start + width],
                                            log_t=log_t_btm[..., start:start + width])
        start += width
    return objectives.TokenTerms(**parts, alpha=alpha)


def chunked_token_loss(
    student: LinearHead,
    x_btd: jax.Array,
    tokens_bt: jax.Array,
    *,
    objective: objectives.ObjectiveConfig = objectives.ObjectiveConfig(),
    chunk_size: int,
    vocab_chunk_size: int = 8192,
    top_k: int = losses.DEFAULT_TOP_K,
    eos: EosMap | None = None,
    target_alpha: jax.Array | None = None,
    prefix_mask_bt: jax.Array | None = None,
    stored: dict[str, jax.Array] | None = None,
    teacher: LinearHead | None = None,
    teacher_x_btd: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
    """(per-token loss [B, T], per-token diagnostics {name: [B, T]}, scores) of `objective`.

    The teacher's log-probs come `stored` (Batch fields, STORED_FIELDS), from `teacher` at
    `teacher_x_btd`, or not at all (objectives without a teacher). Tokens under
    `prefix_mask_bt` (teacher-generated) get objective.prefix_fkl_weight x KL(pi_T || pi_S) on
    the teacher's top-k instead of the objective. `scores`: see `score_response`.
    """
    spec = objectives.get(objective.name)
    need = set(spec.supports) | ({"teacher_topk"} if prefix_mask_bt is not None else set())
    supports = tuple(s for s in objectives.SUPPORTS if s in need)
    scores = score_response(student, x_btd, tokens_bt, supports=supports, chunk_size=chunk_size,
                            top_k=top_k, eos=eos, stored=stored, teacher=teacher,
                            teacher_x_btd=teacher_x_btd)  # fmt: skip
    log_s_btm = response_log_probs(student, x_btd, scores, chunk_size=chunk_size,
                                   vocab_chunk_size=vocab_chunk_size, eos=eos)  # fmt: skip
    terms = token_terms(supports, top_k, log_s_btm, scores["log_t_btm"], target_alpha)
    per_bt, diagnostics = spec.per_token(terms, objective)
    if prefix_mask_bt is not None:
        top = terms.teacher_topk
        imitation_bt = losses.topk_forward_kl_from_log_probs(top.log_s, top.log_t,
                                                             support=objective.topk_support)
        per_bt = jnp.where(prefix_mask_bt, objective.prefix_fkl_weight * imitation_bt, per_bt)
    return per_bt.astype(jnp.float32), diagnostics, scores


# ---------------------------------------------------------------------------------------------
# The step


def teacher_response_hidden(teacher_params: Params, config: TrainConfig, batch: Batch) -> jax.Array:
    """The teacher's hidden states [B, T, D_T] predicting the response tokens; no gradient."""
    x_bsd = hidden_states(
        jax.lax.stop_gradient(teacher_params), config.teacher,
        batch.teacher_input_ids_bs, batch.teacher_attention_mask_bs,
    )  # fmt: skip
    return jax.lax.stop_gradient(response_hidden(x_bsd, batch.response_mask_bt.shape[1]))


def _teacher_source(params_t_head: LinearHead | None, teacher_x_btd, batch: Batch,
                    config: TrainConfig) -> dict[str, Any]:
    """chunked_token_loss's teacher arguments for this batch and mode."""
    if not step_needs_teacher(config, batch):
        return {}
    if batch.uses_stored_teacher:
        return {"stored": {field: getattr(batch, field) for support in step_supports(config, batch)
                           for field in STORED_FIELDS[support]}}
    return {"teacher": params_t_head, "teacher_x_btd": teacher_x_btd}


def loss_fn(
    params: Params, batch: Batch, teacher_x_btd: jax.Array | None, teacher_params: Params | None,
    config: TrainConfig, *, denominator: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """Masked token mean of the objective's per-token loss over the response, and metrics.

    denominator: divide the masked token sums by this count instead of this batch's own
    (a micro-batch's share of the whole batch's mean); None: this batch's response tokens.

    Metrics (aux): student_topk_mass and student_entropy (token means, scalars);
    `diagnostic_sum/<name>` for each of the objective's diagnostics (sums over the response
    tokens outside any teacher prefix) and `diagnostic_tokens` (their count): `train_step`
    turns them into means; per-row [B] float32 token means over the response (0 for a row with
    no response token): student_logprob_b (log pi_S of the response tokens, before the update),
    teacher_logprob_b (log pi_T of the same tokens) and teacher_entropy_b (entropy of the
    EOS-merged teacher distribution); the teacher ones are NaN where no teacher distribution is
    computed (stored mode, objectives without a teacher).
    """
    t = batch.response_mask_bt.shape[1]
    x_bsd = hidden_states(params, config.student, batch.input_ids_bs, batch.attention_mask_bs,
                          remat=config.remat_layers)  # fmt: skip
    teacher_head = lm_head(teacher_params, config.teacher) if teacher_x_btd is not None else None
    per_bt, diagnostics, scores = chunked_token_loss(
        lm_head(params, config.student), response_hidden(x_bsd, t), batch.input_ids_bs[:, -t:],
        objective=config.objective, chunk_size=config.chunk_size,
        vocab_chunk_size=config.vocab_chunk_size, top_k=config.top_k, eos=config.eos,
        target_alpha=batch.target_alpha, prefix_mask_bt=batch.prefix_mask_bt,
        **_teacher_source(teacher_head, teacher_x_btd, batch, config),
    )  # fmt: skip
    m_bt = batch.response_mask_bt.astype(jnp.float32)
    count_b = jnp.maximum(jnp.sum(m_bt, axis=-1), 1.0)

    def masked(x_bt, w_bt):  # masked positions never count (a NaN there neither)
        return jnp.where(w_bt > 0, x_bt.astype(jnp.float32), 0.0) * w_bt

    if denominator is None:
        denominator = jnp.maximum(jnp.sum(m_bt), 1.0)
    aux = {name: jnp.sum(masked(scores[f"{name}_bt"], m_bt)) / denominator
           for name in ("student_topk_mass", "student_entropy")}
    for name in ("student_logprob", "teacher_logprob", "teacher_entropy"):
        aux[f"{name}_b"] = jnp.sum(masked(scores[f"{name}_bt"], m_bt), axis=-1) / count_b
    on_policy_bt = m_bt if batch.prefix_mask_bt is None else m_bt * (~batch.prefix_mask_bt)
    for name, x_bt in diagnostics.items():
        aux[f"diagnostic_sum/{name}"] = jnp.sum(masked(x_bt, on_policy_bt))
    aux["diagnostic_tokens"] = jnp.sum(on_policy_bt)
    return jnp.sum(masked(per_bt, m_bt)) / denominator, aux


def num_microbatches(config: TrainConfig, rows: int) -> int:
    """How many micro-batches a batch of `rows` rows runs in (1: no micro-batching)."""
    mb = config.microbatch_rows
    if mb == 0 or mb >= rows:
        return 1
    if rows % mb:
        raise ValueError(f"microbatch_rows={mb} must divide the batch's {rows} rows")
    return rows // mb


def _split_rows(x: jax.Array, n: int) -> jax.Array:
    """[B, ...] -> [n, B / n, ...] with micro-batch i = rows i, i + n, i + 2n, ...: strided, so
    a micro-batch spans every device of a row-sharded batch (a contiguous split would put each
    micro-batch on 1/n of the devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)


def _merge_rows(x: jax.Array) -> jax.Array:
    """Inverse of `_split_rows`: [n, B / n, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])


def batch_grads(
    params: Params, batch: Batch, teacher_params: Params | None, config: TrainConfig
) -> tuple[jax.Array, dict[str, jax.Array], Params]:  # fmt: skip
    """(loss, aux, grads) of the whole batch's token-mean loss (see `loss_fn`).

    With `config.microbatch_rows`, a `lax.scan` runs one micro-batch at a time (teacher
    forward, student forward + backward) and adds its gradient into a float32 accumulator;
    every micro-batch divides its token sums by the whole batch's token count, so the sum is
    the one-shot gradient (up to float32 summation order). Grads come back in the params' dtype.
    """
    needs_teacher = step_needs_teacher(config, batch) and not batch.uses_stored_teacher

    def one(mb: Batch, denominator):
        teacher_x_btd = None
        if needs_teacher:
            # The teacher is frozen: its forward runs outside value_and_grad.
            teacher_x_btd = teacher_response_hidden(teacher_params, config, mb)
        return jax.value_and_grad(loss_fn, has_aux=True)(
            params, mb, teacher_x_btd, teacher_params, config, denominator=denominator
        )

    n = num_microbatches(config, batch.response_mask_bt.shape[0])
    if n == 1:
        (loss, aux), grads = one(batch, None)
        return loss, aux, grads
    denominator = jnp.maximum(jnp.sum(batch.response_mask_bt.astype(jnp.float32)), 1.0)
    alpha = batch.target_alpha
    rows = jax.tree.map(lambda x: _split_rows(x, n), batch.replace(target_alpha=None))

    def body(carry, mb: Batch):
        g_acc, sums = carry
        (loss, aux), grads = one(mb.replace(target_alpha=alpha), denominator)
        g_acc = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), g_acc, grads)
        # scalars are token sums over the whole batch's denominator (or plain sums): they add
        sums = jax.tree.map(jnp.add, sums, {"loss": loss, **{k: v for k, v in aux.items() if v.ndim == 0}})
        return (g_acc, sums), {k: v for k, v in aux.items() if v.ndim > 0}

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    _, aux_shapes = jax.eval_shape(lambda: one(jax.tree.map(lambda x: x[0], rows).replace(target_alpha=alpha), denominator))[0]
    sums0 = {"loss": jnp.float32(0), **{k: jnp.zeros((), jnp.float32) for k, v in aux_shapes.items()
                                        if v.ndim == 0}}
    (g_acc, sums), per_row = jax.lax.scan(body, (zeros, sums0), rows)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), g_acc, params)
    loss = sums.pop("loss")
    aux = {**sums, **{k: _merge_rows(v) for k, v in per_row.items()}}
    return loss, aux, grads


def _diagnostic_means(aux: dict[str, jax.Array]) -> dict[str, jax.Array]:
    """aux with each `diagnostic_sum/<name>` replaced by its mean `<name>`."""
    tokens = jnp.maximum(aux["diagnostic_tokens"], 1.0)
    out = {k: v for k, v in aux.items() if not k.startswith("diagnostic_")}
    out.update({k.split("/", 1)[1]: v / tokens for k, v in aux.items()
                if k.startswith("diagnostic_sum/")})
    return out


def train_step(
    state: TrainState, batch: Batch, teacher_params: Params | None = None, *, config: TrainConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the objective's loss of the response tokens. Pure; jit via `jit_train_step`.

    Metrics: float32 scalars loss (before the update), grad_norm (before clipping),
    learning_rate (of this update), num_tokens (response tokens counted), student_topk_mass,
    student_entropy (policy entropy), and one per objective diagnostic (its token mean over
    the on-policy response tokens, named as the objective names it);
    float32 [B] student_logprob_b, teacher_logprob_b, teacher_entropy_b (see `loss_fn`).
    A non-finite loss or grad_norm leaves params, opt_state and step as they were (the caller
    sees it in the metrics and raises or counts a skipped update).
    """
    check_batch(batch, config, teacher_params)
    tx, schedule = make_optimizer(config.optim)
    loss, aux, grads = batch_grads(state.params, batch, teacher_params, config)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "num_tokens": jnp.sum(batch.response_mask_bt.astype(jnp.float32)),
        **_diagnostic_means(aux),
    }
    # The old state is donated, so the choice between it and the update is made here (a select
    # XLA fuses into the update), not on the host after the buffers are gone.
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    params, opt_state, step = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                                           (params, opt_state, state.step + 1),
                                           (state.params, state.opt_state, state.step))
    new_state = TrainState(params=params, opt_state=opt_state, step=step, rng=rng)
    return new_state, metrics


# ---------------------------------------------------------------------------------------------
# Shardings and the jitted entry point


def state_shardings(config: TrainConfig, mesh: Mesh, state: TrainState) -> TrainState:
    """NamedShardings for a TrainState (arrays or jax.eval_shape output) from the rules table.

    Optimizer moments follow their parameter's sharding; scalars (step, counts, rng) replicate.
    """
    params_sh = sharding.tree_shardings(qwen3.param_logical_axes(config.student), mesh, state.params)
    replicated = NamedSharding(mesh, PartitionSpec())
    tx, _ = make_optimizer(config.optim)
    opt_sh = optax.tree_map_params(
        tx, lambda _, sh: sh, state.opt_state, params_sh,
        transform_non_params=lambda _: replicated,
    )  # fmt: skip
    return TrainState(params=params_sh, opt_state=opt_sh, step=replicated, rng=replicated)


def batch_shardings(mesh: Mesh, batch: Batch) -> Batch:
    """Batch rows split over the batch mesh axes; everything else replicated."""
    mesh_shape = dict(mesh.shape)

    def one(x):
        if x.ndim == 0:  # target_alpha
            return NamedSharding(mesh, PartitionSpec())
        axes = ("batch", "length") + (None,) * (x.ndim - 2)
        return NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh_shape))

    return jax.tree.map(one, batch)


def teacher_shardings(
    config: TrainConfig, mesh: Mesh, teacher_params: Params,
    rules: tuple[tuple[str, sharding.MeshAxes], ...] = sharding.INFERENCE_AXIS_RULES,
) -> Params:  # fmt: skip
    """The frozen teacher's shardings: INFERENCE_AXIS_RULES by default ("embed" replicated,
    heads / MLP / vocab over tensor), as the rollout places it; LOGICAL_AXIS_RULES when the
    teacher does not fit replicated over data x fsdp."""
    if config.teacher is None:
        raise ValueError("teacher_shardings needs config.teacher")
    return sharding.tree_shardings(qwen3.param_logical_axes(config.teacher), mesh, teacher_params,
                                   rules=rules)  # fmt: skip


def jit_train_step(
    config: TrainConfig,
    *,
    mesh: Mesh | None = None,
    state_sharding: TrainState | None = None,
    batch_sharding: Batch | None = None,
    teacher_sharding: Params | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch, teacher_params=None) -> (state, metrics)`, compiled once per mode/shape.

    The state is donated: params and both Adam moments are updated in place, so a step holds
    one copy of them (three copies of the student's parameters, not six). Under a mesh, the
    shardings come from `state_shardings` / `batch_shardings` / `teacher_shardings`; the call
    runs inside `jax.set_mesh(mesh)` so the model's activation constraints apply. The jitted
    function is `step.jitted` (for `_cache_size()`).
    """
    fn = functools.partial(train_step, config=config)
    if mesh is None:
        jitted = jax.jit(fn, donate_argnums=0)

        def step(state, batch, teacher_params=None):
            return jitted(state, batch, teacher_params)
    else:
        if state_sharding is None or batch_sharding is None:
            raise ValueError("a sharded step needs state_sharding and batch_sharding")
        replicated = NamedSharding(mesh, PartitionSpec())
        jitted = jax.jit(
            fn,
            in_shardings=(state_sharding, batch_sharding, teacher_sharding),
            out_shardings=(state_sharding, replicated),
            donate_argnums=0,
        )

        def step(state, batch, teacher_params=None):
            with jax.set_mesh(mesh):
                return jitted(state, batch, teacher_params)

    step.jitted = jitted
    return step
