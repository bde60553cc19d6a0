"""Logical-axis sharding rules (trb_jax.sharding) and a sharded Qwen3 forward on 8 fake CPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fake_devices import run_on_fake_devices
from trb_jax import sharding
from trb_jax.models import qwen3

MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}


def test_rules_table_maps_parameters():
    spec = sharding.logical_to_spec
    assert spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), MESH_SHAPE) == P(None, "fsdp", "tensor", None)
    assert spec(("vocab", "embed"), (128, 32), MESH_SHAPE) == P("tensor", "fsdp")
    assert spec(("batch", "length", "act_embed"), (8, 5, 32), MESH_SHAPE) == P(("data", "fsdp"), None, None)
    # Without shape/mesh information the table is applied as written.
    assert spec(("batch", "mlp")) == P(("data", "fsdp"), "tensor")


def test_rules_degrade_gracefully():
    spec = sharding.logical_to_spec
    # 2 KV heads cannot be split 4 ways: replicated rather than an invalid sharding.
    assert spec(("kv_heads",), (2,), {"tensor": 4}) == P(None)
    # Batch 2 on data=2 x fsdp=2: keep the prefix of mesh axes that divides it.
    assert spec(("batch",), (2,), MESH_SHAPE) == P("data")
    # Mesh axes missing from the mesh are dropped (a data-only mesh works with the same table).
    assert spec(("batch", "vocab"), (8, 128), {"data": 8}) == P("data", None)
    # A mesh axis is used at most once per array.
    assert spec(("embed", "batch"), (4, 8), MESH_SHAPE) == P("fsdp", "data")
    with pytest.raises(KeyError, match="logical axis 'nonsense' has no rule"):
        spec(("nonsense",))
    with pytest.raises(ValueError, match="do not match shape"):
        spec(("batch",), (2, 3))


def test_constrain_is_identity_without_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", "length")) is x


def test_every_param_has_known_logical_axes():
    config = qwen3.qwen3_8b
    axes = qwen3.param_logical_axes(config)
    shapes = qwen3.param_shapes(config)
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    for ax, shape in zip(jax.tree.leaves(axes, is_leaf=is_leaf), jax.tree.leaves(shapes, is_leaf=is_leaf)):
        sharding.logical_to_spec(ax, shape, MESH_SHAPE)  # raises on an unknown name or rank
    spec = sharding.logical_to_spec(axes["lm_head_dv"], shapes["lm_head_dv"], MESH_SHAPE)
    assert spec == P("fsdp", "tensor")


# ------------------------------------------------------------------------------------------
# 8 fake CPU devices, in a subprocess so that every other test keeps seeing one device.


def _eight_device_check():
    from jax.sharding import NamedSharding

    assert jax.device_count() == 8, jax.devices()
    config = qwen3.Qwen3Config(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, tie_word_embeddings=False, rope_theta=10_000.0,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    shapes = qwen3.param_shapes(config)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.normal(1.0 if "norm" in jax.tree_util.keystr(path) else 0.0, 0.2, s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x),
    )
    ids = rng.integers(1, 128, size=(8, 10)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[::2, :4] = 0  # left padding on half of the rows

    forward = jax.jit(qwen3.forward, static_argnames="config")
    prefill = jax.jit(qwen3.prefill, static_argnames=("config", "cache_len"))
    decode = jax.jit(qwen3.decode_step, static_argnames="config", donate_argnames="cache")

    def run(params, ids, mask):
        logits = forward(params, config, ids, mask)
        last, cache = prefill(params, config, ids[:, :7], mask[:, :7], cache_len=12)
        steps = [last]
        for t in range(7, 10):
            out, cache = decode(params, config, ids[:, t], cache)
            steps.append(out)
        return np.asarray(logits), np.stack([np.asarray(s) for s in steps], 1), cache

    want_logits, want_steps, _ = run(params, jnp.asarray(ids), jnp.asarray(mask))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    shardings = sharding.tree_shardings(qwen3.param_logical_axes(config), mesh, params)
    sharded = jax.device_put(params, shardings)
    assert sharded["layers"]["q_dnh"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert sharded["layers"]["q_dnh"].addressable_shards[0].data.shape == (2, 16, 2, 8)
    batch = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length"), ids.shape, dict(mesh.shape)))
    with jax.set_mesh(mesh):
        got_logits, got_steps, cache = run(
            sharded, jax.device_put(ids, batch), jax.device_put(mask, batch)
        )
        logits_sharding = forward(sharded, config, jax.device_put(ids, batch), jax.device_put(mask, batch)).sharding
    def same(got, spec):
        return got.is_equivalent_to(NamedSharding(mesh, spec), len(spec))

    assert same(logits_sharding, P(("data", "fsdp"), None, "tensor")), logits_sharding
    assert same(cache.k_lbskh.sharding, P(None, ("data", "fsdp"), None, "tensor", None)), cache.k_lbskh.sharding
    scale = np.abs(want_logits).max()
    np.testing.assert_allclose(got_logits, want_logits, atol=1e-5 * scale)
    np.testing.assert_allclose(got_steps, want_steps, atol=1e-5 * scale)
    np.testing.assert_allclose(want_steps, want_logits[:, 6:], atol=1e-5 * scale)
    print("EIGHT_DEVICE_CHECK_OK")


def test_sharded_forward_and_decode_equal_unsharded_on_8_cpu_devices():
    run_on_fake_devices("test_sharding", "_eight_device_check", "EIGHT_DEVICE_CHECK_OK")
