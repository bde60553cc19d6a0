"""The optimizer of the train step: AdamW with linear warmup, cosine decay and clipping.

`OptimConfig` is the config's `optim` section; `make_optimizer(optim)` builds the optax
transformation and its learning-rate schedule (`make_schedule`). Kept apart from the train step
so that reading a config does not import the step (and the model) it configures.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax

__all__ = ["OptimConfig", "make_schedule", "make_optimizer"]


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


def make_schedule(optim: OptimConfig) -> optax.Schedule:
    """lr of update k (0-based): peak (k + 1) / W for k < W = warmup_steps (update 0 learns;
    the last warmup update is at the peak), then cosine decay from the peak at k = W to
    peak * end_lr_fraction at k = decay_steps, and that floor after."""
    peak, w = optim.peak_lr, optim.warmup_steps
    cosine = optax.cosine_decay_schedule(peak, max(optim.decay_steps - w, 1),
                                         alpha=optim.end_lr_fraction)
    if w == 0:
        return cosine

    def schedule(count):
        warm = peak * (jnp.asarray(count, jnp.float32) + 1.0) / w
        return jnp.where(count < w, warm, cosine(jnp.maximum(count - w, 0)))

    return schedule


def make_optimizer(optim: OptimConfig) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(clip_by_global_norm -> adamw(schedule), schedule); schedule: `make_schedule`."""
    schedule = make_schedule(optim)
    tx = optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                    weight_decay=optim.weight_decay),
    )  # fmt: skip
    return tx, schedule
