"""Warmup schedules: the TRB trust-region budget eps_k and the temperature warmup tau_k.

Each factory validates its arguments once (Python errors naming the argument) and returns a
pure function `step -> value` that accepts a Python int or a traced int array, like optax
schedules, so the value can be computed inside a jitted step without recompiling.
"""

from __future__ import annotations

from typing import Callable

import jax.numpy as jnp

__all__ = [
    "Schedule",
    "linear_anneal_eps",
    "constant_eps",
    "temperature_warmup",
    "make_eps_schedule",
    "EPS_SCHEDULES",
    "warmup_is_over",
]

Schedule = Callable[[object], jnp.ndarray]


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be >= 0, got {value}")


def _check_positive_int(name: str, value: int) -> None:
    if int(value) != value or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def linear_anneal_eps(eps0: float, warmup_steps: int) -> Schedule:
    """eps_k = eps0 (1 - k/K) for 0 <= k <= K, then 0 (the paper's annealed TRB budget)."""
    _check_nonneg("eps0", eps0)
    _check_positive_int("warmup_steps", warmup_steps)

    def schedule(step) -> jnp.ndarray:
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
        return jnp.float32(eps0) * (1.0 - frac)

    return schedule


def constant_eps(eps: float) -> Schedule:
    """eps_k = eps for every k (fixed-eps blending baseline)."""
    _check_nonneg("eps", eps)

    def schedule(step) -> jnp.ndarray:
        return jnp.full(jnp.shape(step), eps, jnp.float32)

    return schedule


def temperature_warmup(tau0: float, warmup_steps: int) -> Schedule:
    """tau_k = tau0 + (1 - tau0) min(k/K, 1): student sampling temperature annealed to 1."""
    if not tau0 > 0:
        raise ValueError(f"tau0 must be > 0, got {tau0}")
    _check_positive_int("warmup_steps", warmup_steps)

    def schedule(step) -> jnp.ndarray:
        frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
        return jnp.float32(tau0) + (1.0 - jnp.float32(tau0)) * frac

    return schedule


EPS_SCHEDULES = {"linear": linear_anneal_eps, "constant": constant_eps}


def make_eps_schedule(kind: str, *, eps0: float, warmup_steps: int | None = None) -> Schedule:
    """Builds an eps schedule by name: "linear" (needs warmup_steps) or "constant"."""
    if kind == "linear":
        if warmup_steps is None:
            raise ValueError("warmup_steps is required for the 'linear' eps schedule")
        return linear_anneal_eps(eps0, warmup_steps)
    if kind == "constant":
        return constant_eps(eps0)
    raise ValueError(f"unknown eps schedule {kind!r}; expected one of {sorted(EPS_SCHEDULES)}")


def warmup_is_over(step: int, warmup_steps: int) -> bool:
    """True once eps_k is exactly 0: rollouts are pure student and need no teacher decode."""
    return step >= warmup_steps
