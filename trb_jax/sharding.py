"""Logical-axis sharding: one rules table, mapped onto a device mesh.

Every parameter and the main activations carry *logical* axis names ("embed", "heads", ...).
`LOGICAL_AXIS_RULES` is the single place that says which *mesh* axes ("data", "fsdp", "tensor")
each logical axis is split over. Models never name mesh axes; they call `constrain` on
activations and publish a logical-axes pytree for their parameters.

Mesh axes:
  data    pure data parallelism (batch split, parameters replicated).
  fsdp    batch split and parameters sharded along "embed" (ZeRO-3 style, gathered per layer).
  tensor  Megatron-style tensor parallelism over heads, MLP and vocab.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def make_mesh(
    data: int = 1, fsdp: int = 1, tensor: int = 1, *, devices: Sequence[Any] | None = None
) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh with Auto axis types.

    Auto (not JAX's default Explicit) so that NamedSharding/with_sharding_constraint behave as
    classic pjit: shardings are hints that XLA propagates, not part of array types.
    """
    return jax.make_mesh(
        (data, fsdp, tensor), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices
    )


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


def tree_shardings(logical_tree: Any, mesh: Mesh, shapes_tree: Any) -> Any:
    """NamedShardings for a pytree, given its logical axes and (abstract) arrays.

    `logical_tree` mirrors `shapes_tree` with a tuple of logical names per leaf; `shapes_tree`
    holds arrays or jax.ShapeDtypeStruct (e.g. from jax.eval_shape), so no memory is touched.
    """
    mesh_shape = dict(mesh.shape)
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh_shape)),
        logical_tree,
        shapes_tree,
        is_leaf=_is_axes_leaf,
    )


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
