"""Supervised (pre)training of a small Qwen3 on prompt + response sequences, pure JAX + optax.

    tokens_nt, mask_nt = encode_sft(prompt_ids, response_ids, pad_id)
    params, losses = train(params, config, tokens_nt, mask_nt, TrainSpec(steps=2000), seed=0)

The loss is the mean next-token cross-entropy over response tokens only (the worked solution
and its EOS): the prompt is context, as in SFT. Sequences are right-padded to one length; with
causal attention the padding after a sequence cannot change its logits, and positions start at
0 exactly as they do for a left-padded prompt at rollout time (`qwen3.positions_from_mask`).

Deterministic by seed on a given platform: the initialisation key, the batch order
(`numpy PCG64([seed, epoch])` permutations) and the update are fixed; nothing else is random.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from trb_jax.models import qwen3

__all__ = ["TrainSpec", "encode_sft", "make_optimizer", "sft_loss", "train_step", "train",
           "bucket_lengths"]


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings: AdamW, linear warmup then cosine decay to `final_lr_frac` * lr."""

    steps: int
    batch_size: int = 64
    lr: float = 3e-3
    warmup_steps: int = 100
    final_lr_frac: float = 0.05
    weight_decay: float = 0.01
    clip_norm: float = 1.0


def encode_sft(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
               pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_nt int32 [n, t+1], loss_mask_nt float32 [n, t]) for next-token training.

    Row i is prompt_ids[i] + response_ids[i], right-padded with pad_id to t + 1 tokens
    (t = length, default the longest row minus 1, rounded up to a multiple of 8);
    loss_mask_nt[i, j] = 1 where target tokens_nt[i, j + 1] belongs to the response.
    """
    rows = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    t = length or -(-(max(len(r) for r in rows) - 1) // 8) * 8
    if max(len(r) for r in rows) > t + 1:
        raise ValueError(f"a sequence of {max(len(r) for r in rows)} tokens exceeds {t + 1}")
    tokens = np.full((len(rows), t + 1), pad_id, np.int32)
    mask = np.zeros((len(rows), t), np.float32)
    for i, (row, p) in enumerate(zip(rows, prompt_ids)):
        tokens[i, :len(row)] = row
        mask[i, len(p) - 1:len(row) - 1] = 1.0
    return tokens, mask


# Cached: the optimizer is a static argument of the jitted step, so the same object for the
# same spec lets a second model of the same shape reuse the compiled step.
@functools.lru_cache(maxsize=None)
def make_optimizer(spec: TrainSpec) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, spec.lr, spec.warmup_steps, max(spec.steps, spec.warmup_steps + 1),
        end_value=spec.lr * spec.final_lr_frac)
    return optax.chain(optax.clip_by_global_norm(spec.clip_norm),
                       optax.adamw(schedule, b2=0.99, weight_decay=spec.weight_decay))


def sft_loss(params, config: qwen3.Qwen3Config, tokens_bt: jax.Array, mask_bt: jax.Array):
    """Mean cross-entropy of tokens_bt[:, 1:] over mask_bt (tokens [b, t+1], mask [b, t])."""
    logits_btv = qwen3.forward(params, config, tokens_bt[:, :-1])
    log_p_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    nll_bt = -jnp.take_along_axis(log_p_btv, tokens_bt[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll_bt * mask_bt) / jnp.maximum(jnp.sum(mask_bt), 1.0)


# params and opt_state are donated: the update is written in place of the old state.
@functools.partial(jax.jit, static_argnames=("config", "optimizer"),
                   donate_argnames=("params", "opt_state"))
def train_step(params, opt_state, tokens_bt, mask_bt, *, config: qwen3.Qwen3Config,
               optimizer: optax.GradientTransformation):
    """One AdamW step on a batch -> (params, opt_state, loss)."""
    loss, grads = jax.value_and_grad(sft_loss)(params, config, tokens_bt, mask_bt)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def _batches(n: int, batch_size: int, seed: int):
    epoch = 0
    while True:
        perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i:i + batch_size]
        epoch += 1


def bucket_lengths(mask_nt: np.ndarray, bucket: int) -> np.ndarray:
    """Per row: the position after its last response target, rounded up to a multiple of
    `bucket` (at most the array's length): the columns a length-bucketed batch keeps."""
    t = mask_nt.shape[1]
    last = t - np.argmax(mask_nt[:, ::-1] > 0, axis=1)
    return np.minimum(-(-last // bucket) * bucket, t)


def _bucketed_batches(lengths: np.ndarray, batch_size: int, seed: int):
    """(row indices, length) batches whose rows share a length bucket: each epoch every bucket
    is permuted (PCG64([seed, epoch, bucket length])) and cut into full batches, and the
    batches of all buckets are visited in a PCG64([seed, epoch]) permutation."""
    epoch = 0
    groups = {int(L): np.flatnonzero(lengths == L) for L in np.unique(lengths)}
    while True:
        batches = []
        for L, rows in groups.items():
            perm = rows[np.random.Generator(np.random.PCG64([seed, epoch, L])).permutation(
                len(rows))]
            batches += [(perm[i:i + batch_size], L)
                        for i in range(0, len(perm) - batch_size + 1, batch_size)]
        if not batches:
            raise ValueError(f"no length bucket holds a full batch of {batch_size}")
        for j in np.random.Generator(np.random.PCG64([seed, epoch])).permutation(len(batches)):
            yield batches[j]
        epoch += 1


def train(params, config: qwen3.Qwen3Config, tokens_nt: np.ndarray, mask_nt: np.ndarray,
          spec: TrainSpec, seed: int = 0, log_every: int = 0, name: str = "model",
          bucket: int = 0):
    """`spec.steps` AdamW steps over shuffled batches -> (params, per-step losses [steps]).

    bucket > 0: every batch holds rows of one length bucket (`bucket_lengths`) and is cut to
    that length (less padding for corpora of mixed lengths; one compiled step per bucket).
    bucket = 0 (default): batches of the full padded length, as the first toy world was built.
    """
    optimizer = make_optimizer(spec)
    params = jax.tree.map(jnp.array, params)  # a private copy: the steps donate it
    opt_state = optimizer.init(params)
    losses = np.zeros(spec.steps, np.float32)
    if bucket:
        batches = _bucketed_batches(bucket_lengths(mask_nt, bucket), spec.batch_size, seed)
    else:
        batches = ((idx, mask_nt.shape[1]) for idx in _batches(len(tokens_nt), spec.batch_size,
                                                               seed))
    start = time.perf_counter()
    pending = []
    for step in range(spec.steps):
        idx, length = next(batches)
        params, opt_state, loss = train_step(params, opt_state, tokens_nt[idx, :length + 1],
                                             mask_nt[idx, :length], config=config,
                                             optimizer=optimizer)
        pending.append((step, loss))
        if log_every and ((step + 1) % log_every == 0 or step + 1 == spec.steps):
            for i, l in pending:
                losses[i] = float(l)
            pending = []
            print(f"[{name}] step {step + 1}/{spec.steps} loss {losses[step]:.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    for i, l in pending:
        losses[i] = float(l)
    return params, losses
