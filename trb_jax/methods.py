"""Methods: what each update's rollout behavior is, by a table over the update index.

A method is a small pure function `plan(step, method) -> StepPlan` over the *update index*
(0-based, counting every optimizer update of the run). `METHODS` maps the config's
`method.name` to it. The trainer only reads the plan; it never branches on the method name.
The method is one axis, the objective (trb_jax.objectives, `objective.name`) the other: a plan
names an objective only where the method replaces the run's for a phase (sft_warmup's
supervised updates, veto's bridge during its warmup); otherwise the run's objective applies.
This module holds the one implementation of the eps and tau schedules.

  vanilla      student rollouts, every step.
  trb          TRB warmup: rollouts from mu* with eps_k = eps0 (1 - k/K) for k < K, then pure
               student (the teacher only scores). The paper's method.
  fixed_eps    the same blend with a constant eps0 for the whole run (the teacher decodes with
               the student at every step).
  skd          interleaved teacher injection for k < K (teacher top-`skd_k`, replacement at
               temperature `skd_tau_t`), then student rollouts.
  temperature  student sampling temperature tau_k = tau0 + (1 - tau0) k/K for k < K, then 1.
  sft_warmup   the first `sft_steps` updates are supervised (NLL) on teacher-generated responses
               to the same prompts (same order and multiplicity as the online pipeline), with
               their own optimizer state and schedule (`sft_lr`, constant after the OPD
               warmup length); the student is saved at each of `sft_checkpoints` reached; then
               ordinary OPD from the state after `sft_steps` with a fresh optimizer and exactly
               vanilla's schedule. A run lasts sft_steps + num_steps updates.
  veto         student rollouts; for k < K the objective is the veto bridge (its target at each
               visited prefix is q_alpha ∝ sg(pi_S)^(1-alpha) pi_T^alpha with alpha_k =
               beta_start + (1 - beta_start) k/K), then the run's objective.
  teacher_prefix  off-policy guidance (TrOPD): every rollout's first `prefix_tokens` response
               tokens are sampled from the teacher, the rest from the student; the prefix
               tokens get only the forward-KL imitation term (objective.prefix_fkl_weight).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from trb_jax.rollout import select_program

__all__ = ["MethodConfig", "StepPlan", "METHODS", "plan_step", "total_updates",
           "optimizer_phase"]


@dataclasses.dataclass(frozen=True)
class MethodConfig:
    """The warmup method and its knobs (the config's `method` section).

    name: a key of METHODS.
    warmup_steps: K, updates over which the method anneals to vanilla OPD (trb, skd,
      temperature, veto); > 0.
    eps0: initial trust-region budget (trb) or the constant one (fixed_eps); >= 0.
    skd_k / skd_tau_t: SKD teacher top-K (1..64) and replacement temperature (> 0).
    tau0: initial student temperature of the temperature warmup (> 0).
    sft_steps: supervised updates before OPD (sft_warmup): OPD starts from this checkpoint; >= 1.
    sft_checkpoints: SFT updates after which the student is saved (WORKDIR/sft/step_N, Hugging
      Face format); each initialises ordinary OPD (paper: 15, 25, 50). A run saves those <=
      sft_steps; a run with sft_steps = N repeats the first N SFT updates of a longer one
      exactly (the SFT schedule does not depend on sft_steps).
    sft_lr: peak learning rate of the SFT phase (0: optim.peak_lr); linear warmup over
      optim.warmup_steps, then constant.
    beta_start: initial bridge coefficient of veto, in [0, 1].
    prefix_tokens: length l of the teacher prefix of teacher_prefix, >= 1.
    """

    name: str = "trb"
    warmup_steps: int = 50
    eps0: float = 0.01
    skd_k: int = 15
    skd_tau_t: float = 0.2
    tau0: float = 0.9
    sft_steps: int = 25
    sft_checkpoints: tuple[int, ...] = (15, 25, 50)
    sft_lr: float = 0.0
    beta_start: float = 0.5
    prefix_tokens: int = 8

    def __post_init__(self):
        object.__setattr__(self, "sft_checkpoints", tuple(int(n) for n in self.sft_checkpoints))
        if self.name not in METHODS:
            raise ValueError(f"method.name: unknown method {self.name!r}; choose one of "
                             f"{sorted(METHODS)}")
        if self.warmup_steps <= 0:
            raise ValueError(f"method.warmup_steps: must be > 0, got {self.warmup_steps}")
        if not self.eps0 >= 0:
            raise ValueError(f"method.eps0: must be >= 0, got {self.eps0}")
        if not 1 <= self.skd_k <= 64:
            raise ValueError(f"method.skd_k: must be in [1, 64], got {self.skd_k}")
        if not self.skd_tau_t > 0:
            raise ValueError(f"method.skd_tau_t: must be > 0, got {self.skd_tau_t}")
        if not self.tau0 > 0:
            raise ValueError(f"method.tau0: must be > 0, got {self.tau0}")
        if self.sft_steps < 1:
            raise ValueError(f"method.sft_steps: must be >= 1, got {self.sft_steps}")
        if any(int(n) < 1 for n in self.sft_checkpoints):
            raise ValueError(f"method.sft_checkpoints: every entry must be >= 1, got "
                             f"{tuple(self.sft_checkpoints)}")
        if not self.sft_lr >= 0:
            raise ValueError(f"method.sft_lr: must be >= 0, got {self.sft_lr}")
        if not 0.0 <= self.beta_start <= 1.0:
            raise ValueError(f"method.beta_start: must be in [0, 1], got {self.beta_start}")
        if self.prefix_tokens < 1:
            raise ValueError(f"method.prefix_tokens: must be >= 1, got {self.prefix_tokens}")


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """What one update does.

    behavior: the rollout behavior (a key of trb_jax.behaviors.BEHAVIORS); already reduced by
      `select_program` (an eps-0 blend is the student program).
    objective: the objective of this update when the method replaces the run's (an
      objectives registry name: "sft", "veto"); None: the run's `objective.name`.
    eps / tau / skd_k / skd_tau_t / prefix_tokens: rollout knobs (see behaviors.Knobs).
    target_alpha: the traced coefficient of objectives that read one (veto's bridge; 1.0).
    imitate_prefix: the teacher-sampled prefix tokens get the imitation term, not the objective.
    phase: the optimizer phase ("opd", or "sft" for sft_warmup's supervised updates; see
      `optimizer_phase`).
    warmup: True while the method still differs from vanilla at this step.
    """

    behavior: str
    objective: str | None = None
    eps: float = 0.0
    tau: float = 1.0
    skd_k: int = 15
    skd_tau_t: float = 0.2
    target_alpha: float = 1.0
    prefix_tokens: int = 0
    imitate_prefix: bool = False
    phase: str = "opd"
    warmup: bool = False

    def objective_name(self, run_objective: str) -> str:
        """The objective this update trains with, given the run's."""
        return self.objective or run_objective


def _fraction(step: int, horizon: int) -> float:
    return min(step / horizon, 1.0)


def _vanilla(step: int, m: MethodConfig) -> StepPlan:
    return StepPlan(behavior="student")


def _trb(step: int, m: MethodConfig) -> StepPlan:
    eps = m.eps0 * (1.0 - _fraction(step, m.warmup_steps))
    return StepPlan(behavior=select_program("trb", eps), eps=eps, warmup=eps > 0)


def _fixed_eps(step: int, m: MethodConfig) -> StepPlan:
    return StepPlan(behavior=select_program("fixed_eps", m.eps0), eps=m.eps0, warmup=m.eps0 > 0)


def _skd(step: int, m: MethodConfig) -> StepPlan:
    if step >= m.warmup_steps:
        return StepPlan(behavior="student")
    return StepPlan(behavior="skd", skd_k=m.skd_k, skd_tau_t=m.skd_tau_t, warmup=True)


def _temperature(step: int, m: MethodConfig) -> StepPlan:
    if step >= m.warmup_steps:
        return StepPlan(behavior="student")
    tau = m.tau0 + (1.0 - m.tau0) * _fraction(step, m.warmup_steps)
    return StepPlan(behavior="temperature", tau=tau, warmup=True)


def _sft_warmup(step: int, m: MethodConfig) -> StepPlan:
    if step >= m.sft_steps:
        return StepPlan(behavior="student")
    return StepPlan(behavior="teacher", objective="sft", phase="sft", warmup=True)


def _veto(step: int, m: MethodConfig) -> StepPlan:
    if step >= m.warmup_steps:
        return StepPlan(behavior="student")
    alpha = m.beta_start + (1.0 - m.beta_start) * _fraction(step, m.warmup_steps)
    return StepPlan(behavior="student", objective="veto", target_alpha=alpha, warmup=True)


def _teacher_prefix(step: int, m: MethodConfig) -> StepPlan:
    return StepPlan(behavior="teacher_prefix", prefix_tokens=m.prefix_tokens, imitate_prefix=True,
                    warmup=True)


METHODS: dict[str, Callable[[int, MethodConfig], StepPlan]] = {
    "vanilla": _vanilla,
    "trb": _trb,
    "fixed_eps": _fixed_eps,
    "skd": _skd,
    "temperature": _temperature,
    "sft_warmup": _sft_warmup,
    "veto": _veto,
    "teacher_prefix": _teacher_prefix,
}


def plan_step(step: int, method: MethodConfig) -> StepPlan:
    """The plan of update `step` (0-based) under `method`."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return METHODS[method.name](step, method)


def optimizer_phase(step: int, method: MethodConfig) -> tuple[str, int]:
    """(phase, index within it) of update `step`: ("sft", k) for sft_warmup's supervised
    updates, ("opd", k - sft_steps) after them, ("opd", step) for every other method. Each phase
    has its own optimizer state and schedule, evaluated at the index within the phase; a new
    phase starts from a fresh optimizer state (so OPD update j has vanilla's lr of update j)."""
    if method.name == "sft_warmup":
        return ("sft", step) if step < method.sft_steps else ("opd", step - method.sft_steps)
    return "opd", step


def total_updates(method: MethodConfig, num_steps: int) -> int:
    """Updates in a run of `num_steps` OPD steps (sft_warmup adds its supervised updates)."""
    return num_steps + (method.sft_steps if method.name == "sft_warmup" else 0)
