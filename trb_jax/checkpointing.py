"""Training checkpoints: the TrainState plus a small JSON dict, through an Orbax CheckpointManager.

    manager = checkpointing.make_manager(dir, save_interval_steps=100, max_to_keep=3)
    if checkpointing.should_save(manager, step):
        checkpointing.save(manager, step, state, {"data": stream.position(), ...})
    abstract = checkpointing.abstract_target(state_or_eval_shape, state_shardings)
    state, extra = checkpointing.restore(manager, None, abstract)   # None: the latest step

One checkpoint step is a directory with three Orbax items:
  state  the TrainState pytree (params, opt_state, step, rng) through StandardSave. The typed PRNG
         key cannot be serialised as such: its key_data (uint32 [..., 2] for threefry) is saved
         and `restore` rewraps it with `jax.random.wrap_key_data` under the saved impl.
  extra  the caller's JSON dict (data-stream position, schedule state, config echo, ...).
  meta   {"rng_impl": ..., "format": 1}: what `restore` needs to rebuild the key.

Sharding: arrays are saved as global arrays (OCDBT/Zarr, every process writes only the shards
it holds) and restored onto the shardings of the abstract target, so a checkpoint written on
one mesh (e.g. 1 device) restores onto any other (e.g. 8 devices, fsdp) and vice versa.
Multi-process: every process calls `save`/`restore` with the same arguments; Orbax synchronises
the processes, process 0 writes the JSON items and the metadata, and the checkpoint is written
once (not once per process). The directory must be on a file system every process sees.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from trb_jax.train_step import TrainState

FORMAT_VERSION = 1
_ITEMS = ("state", "extra", "meta")


def make_manager(
    directory: str | os.PathLike, *, save_interval_steps: int = 1, max_to_keep: int | None = None
) -> ocp.CheckpointManager:
    """An Orbax CheckpointManager over `directory` (created if missing; absolute path used).

    save_interval_steps: `should_save(manager, step)` is true every that many steps (an explicit
      `save` always writes). max_to_keep: older steps are deleted beyond it; None keeps all.
    """
    if save_interval_steps <= 0:
        raise ValueError(f"save_interval_steps must be positive, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep <= 0:
        raise ValueError(f"max_to_keep must be positive or None, got {max_to_keep}")
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        # Orbax's default policy also saves the first step it is asked about; a resumed run
        # should not write an extra checkpoint there, so: the interval, plus preemption.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(save_interval_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(n=max_to_keep),
        create=True,
    )
    return ocp.CheckpointManager(
        os.path.abspath(os.fspath(directory)), options=options, item_names=_ITEMS
    )


def should_save(manager: ocp.CheckpointManager, step: int) -> bool:
    """Whether `step` is a multiple of save_interval_steps (and not saved yet), or a preemption
    signal reached every process (`jax.distributed` preemption sync; multi-process only)."""
    return manager.should_save(step)


def latest_step(manager: ocp.CheckpointManager) -> int | None:
    """The newest finished checkpoint step in the directory, or None."""
    return manager.latest_step()


def all_steps(manager: ocp.CheckpointManager) -> list[int]:
    return list(manager.all_steps())


def wait(manager: ocp.CheckpointManager) -> None:
    """Block until every pending asynchronous save has been committed."""
    manager.wait_until_finished()


def _state_tree(state: TrainState) -> dict[str, Any]:
    return {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "rng": jax.random.key_data(state.rng),
    }


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: TrainState,
    extra: Mapping[str, Any] | None = None,
    *,
    block: bool = True,
) -> None:
    """Write `state` and `extra` (JSON-serialisable) as checkpoint `step`, whatever the interval.

    The device arrays are copied to host before this returns, so the caller may donate `state`
    to the next train step right away. block=True (the default) also waits until the checkpoint
    is committed on disk; block=False leaves the write to a background thread (call `wait`
    before exiting or reading it back).
    """
    meta = {"rng_impl": str(jax.random.key_impl(state.rng)), "format": FORMAT_VERSION}
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(_state_tree(state)),
        extra=ocp.args.JsonSave(dict(extra or {})),
        meta=ocp.args.JsonSave(meta),
    )
    manager.save(int(step), args=args, force=True)
    if block:
        manager.wait_until_finished()


def _abstract_leaf(x: Any) -> jax.ShapeDtypeStruct:
    sharding = getattr(x, "sharding", None)
    if sharding is None:  # no target layout given: the first local device
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


def abstract_target(state: Any, shardings: TrainState | None = None) -> TrainState:
    """A TrainState of ShapeDtypeStructs with shardings: the target `restore` expects.

    `state` is a TrainState of arrays or of ShapeDtypeStructs (jax.eval_shape output);
    `shardings` (e.g. train_step.state_shardings(config, mesh, state)) overrides the leaves'
    own shardings.
    """
    if shardings is None:
        return jax.tree.map(_abstract_leaf, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings
    )


def restore(
    manager: ocp.CheckpointManager, step: int | None, abstract_state: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """(state, extra) of checkpoint `step` (None: the latest), laid out as `abstract_state`.

    abstract_state: a TrainState whose leaves are jax.ShapeDtypeStruct (or arrays) carrying the
    target shardings, e.g. `abstract_target(jax.eval_shape(init), state_shardings(...))`; the
    restored arrays have exactly those shardings, shapes and dtypes. Raises FileNotFoundError
    when the directory has no checkpoint (or not `step`).
    """
    if step is None:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {manager.directory}")
    elif step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory} "
                                f"(have {sorted(manager.all_steps())})")  # fmt: skip
    target = jax.tree.map(_abstract_leaf, abstract_state)
    rng_target = target.rng
    key_data = jax.eval_shape(jax.random.key_data, rng_target)
    tree = {
        "params": target.params,
        "opt_state": target.opt_state,
        "step": target.step,
        "rng": jax.ShapeDtypeStruct(key_data.shape, key_data.dtype, sharding=rng_target.sharding),
    }
    restored = manager.restore(
        int(step),
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(tree),
            extra=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        ),
    )
    out, meta = restored["state"], restored["meta"]
    rng = jax.random.wrap_key_data(out["rng"], impl=meta["rng_impl"])
    state = TrainState(params=out["params"], opt_state=out["opt_state"], step=out["step"], rng=rng)
    return state, dict(restored["extra"] or {})


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])


def nonfinite_paths(tree: Any) -> list[str]:
    """Key paths of the floating-point leaves of `tree` holding a NaN or an infinity (a check to
    run once after loading, not per step: one jitted reduction on the leaves' devices, compiled
    once per tree structure)."""
    leaves = [(path, x) for path, x in jax.tree_util.tree_leaves_with_path(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]
    if not leaves:
        return []
    ok = np.asarray(jax.device_get(_leaves_finite([x for _, x in leaves])))
    return [jax.tree_util.keystr(path) for (path, _), good in zip(leaves, ok) if not good]


def reason(e: BaseException) -> str:
    """One line: the exception's type and its message, cut to 300 characters."""
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


def restore_newest_good(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    validate: Callable[[TrainState, dict[str, Any]], None] | None = None,
) -> tuple[int | None, TrainState | None, dict[str, Any] | None, list[tuple[int, str]]]:
    """The newest checkpoint that restores (and passes `validate`, which raises to reject one).

    Returns (step, state, extra, skipped): skipped lists (step, one-line reason) for every newer
    checkpoint that failed; step is None when none restores (or there is none).
    """
    skipped: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            state, extra = restore(manager, step, abstract_state)
            if validate is not None:
                validate(state, extra)
        except Exception as e:  # noqa: BLE001  (a damaged checkpoint fails in many ways)
            skipped.append((step, reason(e)))
            continue
        return step, state, extra, skipped
    return None, None, None, skipped


def set_aside(directory: str | os.PathLike, step: int, into: str | os.PathLike) -> str:
    """Moves checkpoint `step` out of the manager's `directory` into `into`/STEP (nothing is
    deleted; a newer run would otherwise write over it); returns the new path."""
    os.makedirs(into, exist_ok=True)
    target = os.path.join(into, str(step))
    n = 1
    while os.path.exists(target):
        target = os.path.join(into, f"{step}.{n}")
        n += 1
    os.replace(os.path.join(os.fspath(directory), str(step)), target)
    return target


def restore_or_init(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    init: Callable[[], TrainState],
) -> tuple[TrainState, dict[str, Any] | None]:
    """Resume from the latest checkpoint if there is one, else `(init(), None)`."""
    if manager.latest_step() is None:
        return init(), None
    return restore(manager, None, abstract_state)
