"""Logical-axis sharding: one rules table, mapped onto a device mesh.

Every parameter and the main activations carry *logical* axis names ("embed", "heads", ...).
`LOGICAL_AXIS_RULES` is the single place that says which *mesh* axes ("data", "fsdp", "tensor")
each logical axis is split over. Models never name mesh axes; they call `constrain` on
activations and publish a logical-axes pytree for their parameters (and the shardings built
from it: `qwen3.param_shardings`). This module knows no model, so models can import it.

Mesh axes:
  data    pure data parallelism (batch split, parameters replicated).
  fsdp    batch split and parameters sharded along "embed" (ZeRO-3 style, gathered per layer).
  tensor  Megatron-style tensor parallelism over heads, MLP and vocab.

What goes where (LOGICAL_AXIS_RULES; docs/scaling.md has the memory plan):
  student params     ("embed" -> fsdp, heads/kv_heads/mlp/vocab -> tensor); Adam moments and
                     gradients follow their parameter (train_step.state_shardings).
  teacher params     inference only: INFERENCE_AXIS_RULES keeps "embed" replicated, so a decode
                     step never all-gathers the teacher over fsdp (heads/mlp/vocab still split
                     over tensor). Use the training rules instead when the teacher does not fit
                     replicated (`tree_shardings(..., rules=LOGICAL_AXIS_RULES)`).
  KV caches          [layers, batch, cache_length, kv_heads, head_dim]: rows over (data, fsdp),
                     KV heads over tensor (qwen3.kv_cache_shardings,
                     rollout.decode_state_shardings).
  batches, prompts,  rows over (data, fsdp), the rest replicated (batch_tree_shardings).
  rollout outputs
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
LogicalAxes = tuple[str | None, ...]

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# The one table. Activations use "act_embed" rather than "embed" because the batch dimension
# already occupies "fsdp"; a mesh axis may appear at most once in a PartitionSpec.
LOGICAL_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("cache_length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
)


def override_rules(
    rules: Sequence[tuple[str, MeshAxes]], **changes: MeshAxes
) -> tuple[tuple[str, MeshAxes], ...]:
    """`rules` with some logical axes remapped (names must exist; order kept)."""
    names = {name for name, _ in rules}
    unknown = set(changes) - names
    if unknown:
        raise KeyError(f"logical axes {sorted(unknown)} have no rule to override")
    return tuple((name, changes.get(name, axes)) for name, axes in rules)


# Inference-only weights (the frozen teacher in the rollout and in the teacher-mode loss): the
# same table with "embed" replicated. FSDP would all-gather every weight once per decode step
# (the whole teacher per generated token); replicating over data/fsdp costs memory instead.
INFERENCE_AXIS_RULES: tuple[tuple[str, MeshAxes], ...] = override_rules(
    LOGICAL_AXIS_RULES, embed=None
)


def resolve_mesh_shape(
    num_devices: int, data: int = 1, fsdp: int = 1, tensor: int = 1
) -> tuple[int, int, int]:
    """(data, fsdp, tensor) with at most one -1 replaced by the devices left over.

    Raises ValueError unless the product equals `num_devices`.
    """
    sizes = [data, fsdp, tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
    if any(n == 0 or n < -1 for n in sizes):
        raise ValueError(f"mesh axis sizes must be positive or -1, got {sizes}")
    if -1 in sizes:
        known = math.prod(n for n in sizes if n != -1)
        if num_devices % known:
            raise ValueError(f"{num_devices} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} "
            f"devices, but {num_devices} are available"
        )
    return sizes[0], sizes[1], sizes[2]


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types over all (or the given) devices.

    One axis may be -1: it takes the devices the others leave (`make_mesh(fsdp=-1)` is pure FSDP
    over every device of every process). Auto (not JAX's default Explicit) so that
    NamedSharding/with_sharding_constraint behave as classic pjit: shardings are hints that XLA
    propagates, not part of array types. jax.make_mesh orders devices by the physical topology
    (ICI / NVLink innermost), so "tensor", the last axis, gets the fastest links, and on
    several hosts "data" (the first axis) is the one that crosses hosts.
    """
    n = len(devices) if devices is not None else jax.device_count()
    shape = resolve_mesh_shape(n, data, fsdp, tensor)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def _as_tuple(mesh_axes: MeshAxes) -> tuple[str, ...]:
    if mesh_axes is None:
        return ()
    if isinstance(mesh_axes, str):
        return (mesh_axes,)
    return tuple(mesh_axes)


def logical_to_spec(
    logical_axes: LogicalAxes,
    shape: Sequence[int] | None = None,
    mesh_shape: Mapping[str, int] | None = None,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array whose dimensions carry `logical_axes`.

    Promises a spec that is always valid for `shape` on a mesh of `mesh_shape`:
      * mesh axes absent from `mesh_shape` are dropped (a data-only mesh just works);
      * a mesh axis already used by an earlier dimension is dropped;
      * when `shape` is given, mesh axes are kept only while their size product divides the
        dimension (e.g. 2 KV heads on a tensor axis of 4 stay replicated).
    A `None` logical name means replicated. Unknown logical names raise KeyError.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(logical_axes):
        raise ValueError(f"logical axes {logical_axes} do not match shape {tuple(shape)}")
    used: set[str] = set()
    out: list[MeshAxes] = []
    for dim, name in enumerate(logical_axes):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES")
        kept: list[str] = []
        product = 1
        for axis in _as_tuple(table[name]):
            if axis in used or (mesh_shape is not None and axis not in mesh_shape):
                continue
            size = 1 if mesh_shape is None else mesh_shape[axis]
            if shape is not None and shape[dim] % (product * size) != 0:
                break
            kept.append(axis)
            product *= size
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def _is_axes_leaf(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def tree_shardings(
    logical_tree: Any,
    mesh: Mesh,
    shapes_tree: Any,
    *,
    rules: Sequence[tuple[str, MeshAxes]] = LOGICAL_AXIS_RULES,
) -> Any:
    """NamedShardings for a pytree, given its logical axes and (abstract) arrays.

    `logical_tree` mirrors `shapes_tree` with a tuple of logical names per leaf; `shapes_tree`
    holds arrays or jax.ShapeDtypeStruct (e.g. from jax.eval_shape), so no memory is touched.
    `rules`: INFERENCE_AXIS_RULES for inference-only weights (see the module docstring).
    """
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh_shape, rules)),
        logical_tree,
        shapes_tree,
        is_leaf=_is_axes_leaf,
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_tree_shardings(mesh: Mesh, tree: Any) -> Any:
    """Every array of `tree` split along its leading (row) dimension over the batch axes.

    For prompts, per-row keys, rollout outputs and batches of any rank; scalars replicate.
    A row count the batch axes do not divide falls back to the prefix that does (see
    `logical_to_spec`).
    """
    mesh_shape = dict(mesh.shape)

    def one(x):
        if x.ndim == 0:
            return replicated(mesh)
        axes = ("batch",) + (None,) * (x.ndim - 1)
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh_shape))

    return jax.tree.map(one, tree)


def init_sharded(
    init_fn: Callable[..., Any],
    *args: Any,
    out_shardings: Any | Callable[[Any], Any],
    donate_argnums: int | Sequence[int] = (),
) -> Any:
    """Shape-first initialisation: `jax.eval_shape` -> shardings -> `jit(init, out_shardings)`.

    `out_shardings` is a pytree of Shardings matching init_fn's output, or a function from the
    abstract output (ShapeDtypeStructs) to one. Every array is created directly in its shards,
    so nothing of full size is ever materialised on one device. Examples:

        params = init_sharded(lambda k: qwen3.init_params(cfg, k), key,
                              out_shardings=qwen3.param_shardings(cfg, mesh))
        state = init_sharded(lambda p: ts.init_train_state(p, tcfg, rng), params,
                             out_shardings=lambda a: ts.state_shardings(tcfg, mesh, a),
                             donate_argnums=0)
    """
    if callable(out_shardings) and not isinstance(out_shardings, jax.sharding.Sharding):
        out_shardings = out_shardings(jax.eval_shape(init_fn, *args))
    return jax.jit(init_fn, out_shardings=out_shardings, donate_argnums=donate_argnums)(*args)


def per_device_bytes(tree: Any) -> dict[Any, int]:
    """Bytes of `tree`'s addressable shards per device (what the shardings cost in memory)."""
    out: dict[Any, int] = {}
    for x in jax.tree.leaves(tree):
        for shard in x.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def constrain(x: jax.Array, logical_axes: LogicalAxes) -> jax.Array:
    """Constrain an activation's sharding by logical axes; the identity without a mesh.

    The mesh is the ambient one set by `jax.set_mesh(mesh)`; with none set (single-device
    code, tests) this returns `x` unchanged, so models can call it unconditionally.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = logical_to_spec(logical_axes, x.shape, dict(mesh.shape))
    return jax.lax.with_sharding_constraint(x, spec)
