"""The OPD train step: student forward chunked over the response, top-k reverse KL, AdamW.

`train_step(state, batch, teacher_params=None, *, config) -> (state, metrics)` is pure and jits
once per (config, shapes, mode). Two modes, chosen by what the batch carries:

* stored (TRB warmup; the teacher ran inside the rollout): `batch.topk_ids_btk` and
  `batch.topk_teacher_logprob_btk` are the rollout's, so no teacher forward runs here;
* teacher (after warmup): the teacher scores the batch in one batched forward, outside the
  gradient, at the student's top-k ids (chosen per chunk from the student logits).

Layout (every row): `[left-padded prompt | response window of T columns]`. The response window
is the rollout's T = max_new_tokens columns, so response token j sits at column P + j of the
student sequence (P = its prompt width) and at column P' + j of the teacher's (P' = the
teacher's prompt width; its template may differ). The prediction for column c is read at
column c - 1, so both models' predictions for response token j are their hidden states at
P - 1 + j and P' - 1 + j: the alignment needs only the widths, no per-row offsets. `_bt`
names below are response-window aligned [B, T]; full sequences are `_bs` [B, S = P + T].

Memory: logits exist one chunk at a time. Hidden states [B, T, D] are computed once per model;
`lax.map` over T-chunks runs unembed -> (EOS merge) -> log_softmax -> gather under
`jax.checkpoint`, so the backward pass recomputes one chunk's logits instead of keeping
[B, T, V] float32 residuals.
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

from trb_jax import losses, sharding
from trb_jax.blending import EosMap, merge_eos
from trb_jax.models import qwen3

Params = Any


# ---------------------------------------------------------------------------------------------
# Configuration, state, batch


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup + cosine decay to `end_lr_fraction` and global-norm clipping."""

    peak_lr: float = 1e-6
    warmup_steps: int = 0
    decay_steps: int = 1000
    end_lr_fraction: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings of the step (hashable: the jit static argument).

    teacher: the teacher's architecture; only the teacher mode needs it.
    chunk_size: response positions per logits chunk (the last chunk is padded and masked).
    eos: the rollout's EosMap; both models' logits are EOS-merged before the log-softmax, as
      the rollout did when it recorded the top-k ids and teacher log-probs. None: no merge.
    remat_layers: checkpoint each decoder layer of the student forward (long sequences).
    """

    student: qwen3.Qwen3Config
    teacher: qwen3.Qwen3Config | None = None
    optim: OptimConfig = OptimConfig()
    top_k: int = losses.DEFAULT_TOP_K
    chunk_size: int = 256
    renormalize: bool = True
    eos: EosMap | None = None
    remat_layers: bool = False

    def __post_init__(self):
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be a positive number of positions, got {self.chunk_size}")
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


@flax.struct.dataclass
class Batch:
    """One training batch (see the module docstring for the layout).

    input_ids_bs / attention_mask_bs: the student's [prompt | response] ids and mask [B, S].
    response_mask_bt: [B, T] bool, response tokens whose prediction counts (the rollout's
      response_mask_bt); T is the response window, the last T columns of input_ids_bs.
    topk_ids_btk / topk_teacher_logprob_btk: [B, T, k] the rollout's student top-k ids and the
      teacher's log-probs there (stored mode).
    teacher_input_ids_bs / teacher_attention_mask_bs: [B, S'] the teacher's own
      [prompt | same response] sequence (teacher mode); its last T columns are the response.
    """

    input_ids_bs: jax.Array
    attention_mask_bs: jax.Array
    response_mask_bt: jax.Array
    topk_ids_btk: jax.Array | None = None
    topk_teacher_logprob_btk: jax.Array | None = None
    teacher_input_ids_bs: jax.Array | None = None
    teacher_attention_mask_bs: jax.Array | None = None

    @property
    def uses_stored_teacher(self) -> bool:
        return self.topk_ids_btk is not None


def make_optimizer(optim: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip_by_global_norm -> adamw(schedule), schedule)."""
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0 if optim.warmup_steps else optim.peak_lr,
        peak_value=optim.peak_lr,
        warmup_steps=optim.warmup_steps,
        decay_steps=max(optim.decay_steps, optim.warmup_steps + 1),
        end_value=optim.peak_lr * optim.end_lr_fraction,
    )
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay),
    )  # fmt: skip
    return tx, schedule


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
    stored = batch.topk_ids_btk is not None or batch.topk_teacher_logprob_btk is not None
    scored = batch.teacher_input_ids_bs is not None or batch.teacher_attention_mask_bs is not None
    if stored == scored:
        raise ValueError(
            "a batch carries either the rollout's top-k teacher scores (topk_ids_btk, "
            "topk_teacher_logprob_btk) or the teacher's own sequence (teacher_input_ids_bs, "
            "teacher_attention_mask_bs), exactly one of the two"
        )
    if stored:
        want = (b, t, config.top_k)
        for name in ("topk_ids_btk", "topk_teacher_logprob_btk"):
            x = getattr(batch, name)
            if x is None or x.shape != want:
                got = None if x is None else x.shape
                raise ValueError(f"{name} must have shape [B, T, top_k] = {want}, got {got}")
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


def qwen3_head(params: Params, config: qwen3.Qwen3Config) -> Callable[[jax.Array], jax.Array]:
    """x [B, C, D] -> float32 logits [B, C, V] (final norm + LM head)."""
    return lambda x_bcd: qwen3.unembed(params, config, x_bcd)


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


def chunked_topk_kl(
    student_head: Callable[[jax.Array], jax.Array],
    x_btd: jax.Array,
    *,
    chunk_size: int,
    top_k: int = losses.DEFAULT_TOP_K,
    renormalize: bool = True,
    eos: EosMap | None = None,
    topk_ids_btk: jax.Array | None = None,
    topk_teacher_logprob_btk: jax.Array | None = None,
    teacher_head: Callable[[jax.Array], jax.Array] | None = None,
    teacher_x_btd: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Per-token top-k reverse KL [B, T] and the student's mass on its support [B, T].

    The student's distribution at response position t is `student_head(x_btd[:, t])`. The
    teacher's log-probs at the support come either stored (`topk_*`, the support is the stored
    ids) or from `teacher_head(teacher_x_btd)` at the student's own top-k ids (chosen without
    gradient). Only one [B, chunk_size, V] chunk of logits per model is live at a time, in the
    forward and (by rematerialisation) in the backward pass.
    """
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}")
    stored = topk_ids_btk is not None
    if stored == (teacher_head is not None):
        raise ValueError("give either the stored top-k teacher log-probs or a teacher head")
    if stored and topk_teacher_logprob_btk is None:
        raise ValueError("topk_ids_btk needs topk_teacher_logprob_btk")
    if not stored and teacher_x_btd is None:
        raise ValueError("teacher_head needs teacher_x_btd")
    t = x_btd.shape[1]
    chunk = min(chunk_size, t)
    n = -(-t // chunk)

    if stored:
        xs = (_chunks(x_btd, chunk, n), _chunks(topk_ids_btk, chunk, n),
              _chunks(topk_teacher_logprob_btk.astype(jnp.float32), chunk, n))  # fmt: skip
    else:
        xs = (_chunks(x_btd, chunk, n), _chunks(jax.lax.stop_gradient(teacher_x_btd), chunk, n))

    @jax.checkpoint
    def one_chunk(xs_chunk):
        x_bcd = xs_chunk[0]
        log_s_bcv = _log_probs(student_head(x_bcd), eos)
        if stored:
            ids_bck, log_t_bck = xs_chunk[1], xs_chunk[2]
        else:
            ids_bck = losses.topk_support(log_s_bcv, top_k)
            log_t_bcv = jax.lax.stop_gradient(_log_probs(teacher_head(xs_chunk[1]), eos))
            log_t_bck = jnp.take_along_axis(log_t_bcv, ids_bck, axis=-1)
        log_s_bck = jnp.take_along_axis(log_s_bcv, ids_bck, axis=-1)
        kl_bc = losses.topk_reverse_kl_from_log_probs(log_s_bck, log_t_bck, renormalize=renormalize)
        mass_bc = jnp.sum(jnp.exp(jax.lax.stop_gradient(log_s_bck)), axis=-1)
        return kl_bc, mass_bc

    kl_nbc, mass_nbc = jax.lax.map(one_chunk, xs)
    return _unchunk(kl_nbc, t), _unchunk(mass_nbc, t)


# ---------------------------------------------------------------------------------------------
# The step


def teacher_response_hidden(teacher_params: Params, config: TrainConfig, batch: Batch) -> jax.Array:
    """The teacher's hidden states [B, T, D_T] predicting the response tokens; no gradient."""
    x_bsd = hidden_states(
        jax.lax.stop_gradient(teacher_params), config.teacher,
        batch.teacher_input_ids_bs, batch.teacher_attention_mask_bs,
    )  # fmt: skip
    return jax.lax.stop_gradient(response_hidden(x_bsd, batch.response_mask_bt.shape[1]))


def loss_fn(
    params: Params, batch: Batch, teacher_x_btd: jax.Array | None, teacher_params: Params | None,
    config: TrainConfig,
) -> tuple[jax.Array, dict[str, jax.Array]]:  # fmt: skip
    """Masked token-mean top-k reverse KL over the response, and auxiliary metrics."""
    t = batch.response_mask_bt.shape[1]
    x_bsd = hidden_states(params, config.student, batch.input_ids_bs, batch.attention_mask_bs,
                          remat=config.remat_layers)  # fmt: skip
    common = dict(chunk_size=config.chunk_size, top_k=config.top_k,
                  renormalize=config.renormalize, eos=config.eos)  # fmt: skip
    if batch.uses_stored_teacher:
        kl_bt, mass_bt = chunked_topk_kl(
            qwen3_head(params, config.student), response_hidden(x_bsd, t), **common,
            topk_ids_btk=batch.topk_ids_btk,
            topk_teacher_logprob_btk=batch.topk_teacher_logprob_btk,
        )  # fmt: skip
    else:
        kl_bt, mass_bt = chunked_topk_kl(
            qwen3_head(params, config.student), response_hidden(x_bsd, t), **common,
            teacher_head=qwen3_head(teacher_params, config.teacher), teacher_x_btd=teacher_x_btd,
        )  # fmt: skip
    mask_bt = batch.response_mask_bt
    loss = losses.masked_mean(kl_bt, mask_bt)
    return loss, {"student_topk_mass": losses.masked_mean(mass_bt, mask_bt)}


def train_step(
    state: TrainState, batch: Batch, teacher_params: Params | None = None, *, config: TrainConfig
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One AdamW step on the top-k reverse KL of the response tokens. Pure; jit via `jit_train_step`.

    Metrics (float32 scalars): loss (before the update), grad_norm (before clipping),
    learning_rate (of this update), num_tokens (response tokens counted), student_topk_mass.
    """
    check_batch(batch, config, teacher_params)
    teacher_x_btd = None
    if not batch.uses_stored_teacher:
        # The teacher is frozen: its forward runs outside value_and_grad, once for the batch.
        teacher_x_btd = teacher_response_hidden(teacher_params, config, batch)
    tx, schedule = make_optimizer(config.optim)
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, teacher_x_btd, teacher_params, config
    )
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
        "num_tokens": jnp.sum(batch.response_mask_bt.astype(jnp.float32)),
        **aux,
    }
    new_state = TrainState(params=params, opt_state=opt_state, step=state.step + 1, rng=rng)
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
        axes = ("batch", "length") + (None,) * (x.ndim - 2)
        return NamedSharding(mesh, sharding.logical_to_spec(axes, x.shape, mesh_shape))

    return jax.tree.map(one, batch)


def teacher_shardings(config: TrainConfig, mesh: Mesh, teacher_params: Params) -> Params:
    if config.teacher is None:
        raise ValueError("teacher_shardings needs config.teacher")
    return sharding.tree_shardings(qwen3.param_logical_axes(config.teacher), mesh, teacher_params)


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
