"""Multi-process JAX: start-up, per-process data loading, process-0-only side effects.

    distributed.initialize()                      # before any other JAX call; no-op on 1 process
    mesh = sharding.make_mesh(data=-1, fsdp=8)    # every device of every process
    rows = distributed.process_row_slice(global_batch_size)   # this process's rows
    local = load(rows)                            # host arrays [rows, ...]
    batch = distributed.global_batch_from_local(local, train_step.batch_shardings(mesh, ...))
    distributed.log_metrics(writer_fn, metrics)   # process 0 only

Start-up sources, in order: explicit arguments; the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES /
JAX_PROCESS_ID (/ JAX_LOCAL_DEVICE_IDS) environment variables; cluster auto-detection by
`jax.distributed.initialize()` with no arguments (SLURM `srun`, Cloud TPU pods, Open MPI, and
the other environments JAX knows), used when a cluster environment is detected. With none of
these (a plain `python` on one machine) `initialize` does nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

_log = logging.getLogger(__name__)

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"

# Environment variables that mean "a multi-process cluster launched this process": JAX's own
# cluster detection (jax._src.clusters) handles each of them when called without arguments.
_CLUSTER_MARKERS: tuple[tuple[str, Callable[[dict[str, str]], bool]], ...] = (
    ("SLURM", lambda env: "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1),
    ("Open MPI", lambda env: int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1),
    ("MPICH", lambda env: int(env.get("PMI_SIZE", "1")) > 1),
    ("Cloud TPU pod", lambda env: bool(env.get("TPU_WORKER_HOSTNAMES", "").count(",")) or
                                   bool(env.get("MEGASCALE_COORDINATOR_ADDRESS"))),
    ("Kubernetes (JobSet)", lambda env: "JOBSET_NAME" in env),
)  # fmt: skip

_initialized = False


def detected_cluster(env: dict[str, str] | None = None) -> str | None:
    """The name of the multi-process launcher found in `env` (os.environ), or None."""
    env = dict(os.environ) if env is None else env
    for name, test in _CLUSTER_MARKERS:
        try:
            if test(env):
                return name
        except ValueError:  # a malformed count: not a cluster we can trust
            continue
    return None


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    return None if value in (None, "") else int(value)


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
    *,
    initialization_timeout: int = 300,
) -> bool:
    """Join (or start) the multi-process JAX runtime; returns whether it is multi-process.

    Call it first thing in the entry point, before any computation (JAX fixes the device list
    on first use). Idempotent. Explicit arguments win over JAX_* environment variables, which
    win over cluster auto-detection; with nothing set and no cluster detected it is a no-op and
    the run is single-process.
    """
    global _initialized
    if _initialized or jax.distributed.is_initialized():
        _initialized = True
        return jax.process_count() > 1
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    if local_device_ids is None and os.environ.get(ENV_LOCAL_DEVICE_IDS):
        local_device_ids = [int(i) for i in os.environ[ENV_LOCAL_DEVICE_IDS].split(",")]
    explicit = coordinator_address is not None or num_processes is not None or process_id is not None
    if explicit:
        if num_processes == 1 and coordinator_address is None:
            return False  # one process, said explicitly: nothing to join
        _log.info("jax.distributed.initialize(%s, num_processes=%s, process_id=%s)",
                  coordinator_address, num_processes, process_id)  # fmt: skip
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes,
            process_id=process_id, local_device_ids=local_device_ids,
            initialization_timeout=initialization_timeout,
        )  # fmt: skip
    else:
        cluster = detected_cluster()
        if cluster is None:
            return False
        _log.info("jax.distributed.initialize(): auto-detecting the %s cluster", cluster)
        jax.distributed.initialize(
            local_device_ids=local_device_ids, initialization_timeout=initialization_timeout
        )
    _initialized = True
    return jax.process_count() > 1


def shutdown() -> None:
    """Leave the multi-process runtime (a no-op if `initialize` did not join one)."""
    global _initialized
    if jax.distributed.is_initialized():
        jax.distributed.shutdown()
    _initialized = False


def is_primary() -> bool:
    """True on process 0: the one that writes logs, metrics and other single-copy files."""
    return jax.process_index() == 0


def process_row_slice(
    global_batch: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The rows [start, stop) of a `global_batch`-row batch that this process loads.

    Rows are split into equal contiguous blocks in process order, which is the order in which
    `jax.make_array_from_process_local_data` lays the processes' blocks out along the batch
    axes of a mesh made by `sharding.make_mesh` (process-major device order). Raises ValueError
    unless the process count divides the batch.
    """
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if global_batch % count:
        raise ValueError(f"global batch {global_batch} is not divisible by {count} processes")
    per = global_batch // count
    return slice(index * per, (index + 1) * per)


def global_batch_from_local(local_tree: Any, shardings: Any) -> Any:
    """Global jax.Arrays from each process's rows (the leading dimension) of every leaf.

    local_tree: host (NumPy) arrays, this process's `process_row_slice` rows of each field.
    shardings: a matching pytree of NamedShardings over the whole multi-process mesh, e.g.
      `train_step.batch_shardings(mesh, abstract_global_batch)`; the global shape is the local
      one with the rows multiplied by the number of processes the batch axes span.
    A pytree node that is None (an absent Batch field) stays None. On one process this is a
    sharded `device_put`.
    """

    def one(local, sharding):
        local = np.asarray(local)
        return jax.make_array_from_process_local_data(sharding, local)

    return jax.tree.map(one, local_tree, shardings)


def local_rows(global_array: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, as one host array.

    The inverse of `global_batch_from_local` for arrays whose leading dimension is split over
    the processes in order (rollout outputs, for grading on the host that loaded the prompts).
    Replicated arrays come back whole.
    """
    shards = sorted(global_array.addressable_shards, key=lambda s: s.index[0].start or 0)
    blocks, seen = [], set()
    for shard in shards:
        start = shard.index[0].start or 0
        if start in seen:  # the same rows on another local device (replicated over tensor)
            continue
        seen.add(start)
        blocks.append(np.asarray(shard.data))
    return np.concatenate(blocks, axis=0)


def on_primary(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) on process 0; None elsewhere (no collective: any process may call)."""
    return fn(*args, **kwargs) if is_primary() else None


def fetch(x: Any) -> np.ndarray:
    """A host copy of a global array: replicated or local arrays directly, sharded ones
    all-gathered over the processes (a collective: every process must call it)."""
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def log_metrics(write: Callable[[dict[str, Any]], Any], metrics: dict[str, Any]) -> None:
    """Fetch `metrics` to host and `write` them on process 0 only.

    Scalars become floats, other arrays (per-row metrics) lists. Every process must call this
    with the same metrics: a sharded metric is all-gathered, which is a collective.
    """
    host = {}
    for name, value in metrics.items():
        array = fetch(value)
        host[name] = float(array) if array.ndim == 0 else array.tolist()
    if is_primary():
        write(host)


def sync(name: str = "trb_jax_sync") -> None:
    """A barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
