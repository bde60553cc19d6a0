"""Training checkpoints (trb_jax.checkpointing): bitwise round trips, steps, and mesh changes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fake_devices import run_on_fake_devices
from trb_jax import checkpointing as ck
from trb_jax import train_step as ts
from trb_jax.models import qwen3

STUDENT = qwen3.Qwen3Config(
    vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, tie_word_embeddings=False, rope_theta=10_000.0,
)  # fmt: skip
CONFIG = ts.TrainConfig(student=STUDENT, optim=ts.OptimConfig(peak_lr=1e-3))
EXTRA = {"data": {"epoch": 1, "index": 37, "seed": 0}, "eps": 0.0125, "phase": "warmup", "tags": [1, 2]}


def random_state(seed: int, dtype=jnp.float32, rng_impl: str = "threefry2x32") -> ts.TrainState:
    """A TrainState whose every leaf (Adam moments and count included) is random, not zeros."""
    rng = np.random.default_rng(seed)

    def draw(x):
        if jnp.issubdtype(x.dtype, jnp.integer):
            return jnp.asarray(rng.integers(0, 1000, x.shape), x.dtype)
        return jnp.asarray(rng.normal(size=x.shape), x.dtype)

    params = jax.tree.map(lambda s: jnp.zeros(s, dtype), qwen3.param_shapes(STUDENT),
                          is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x))  # fmt: skip
    state = ts.init_train_state(params, CONFIG, jax.random.key(seed, impl=rng_impl))
    state = state.replace(params=jax.tree.map(draw, state.params), opt_state=jax.tree.map(draw, state.opt_state))
    # Advance the key once so it is not a freshly seeded one.
    return state.replace(step=jnp.asarray(seed + 11, jnp.int32), rng=jax.random.split(state.rng)[0])


def assert_states_bitwise_equal(got: ts.TrainState, want: ts.TrainState) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    assert jax.random.key_impl(got.rng) == jax.random.key_impl(want.rng)
    np.testing.assert_array_equal(jax.random.key_data(got.rng), jax.random.key_data(want.rng))
    for g, w in zip(jax.tree.leaves(got.replace(rng=None)), jax.tree.leaves(want.replace(rng=None))):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(np.asarray(g).reshape(-1).view(np.uint8), np.asarray(w).reshape(-1).view(np.uint8))


@pytest.mark.parametrize("dtype,impl", [(jnp.float32, "threefry2x32"), (jnp.bfloat16, "rbg")])
def test_round_trip_is_bitwise_with_extra(tmp_path, dtype, impl):
    state = random_state(0, dtype, impl)
    manager = ck.make_manager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None)
    assert ck.latest_step(manager) is None
    ck.save(manager, 7, state, EXTRA)
    assert ck.latest_step(manager) == 7
    got, extra = ck.restore(manager, None, ck.abstract_target(state))
    assert_states_bitwise_equal(got, state)
    assert extra == EXTRA
    # The restored key draws the same numbers as the original.
    np.testing.assert_array_equal(jax.random.uniform(got.rng, (4,)), jax.random.uniform(state.rng, (4,)))
    manager.close()


def test_steps_interval_max_to_keep_and_reopen(tmp_path):
    directory = tmp_path / "ckpt"
    manager = ck.make_manager(directory, save_interval_steps=10, max_to_keep=2)
    assert ck.should_save(manager, 10) and not ck.should_save(manager, 15)
    states = {s: random_state(s) for s in (3, 10, 20)}
    for step, state in states.items():  # explicit saves are forced, off-interval step 3 too
        ck.save(manager, step, state, {"step": step})
    assert ck.all_steps(manager) == [10, 20]  # max_to_keep = 2 dropped step 3
    manager.close()

    reopened = ck.make_manager(directory, save_interval_steps=10, max_to_keep=2)
    assert ck.latest_step(reopened) == 20
    target = ck.abstract_target(jax.eval_shape(lambda: states[3]))
    got, extra = ck.restore(reopened, 10, target)
    assert_states_bitwise_equal(got, states[10])
    assert extra == {"step": 10}
    with pytest.raises(FileNotFoundError, match="no checkpoint for step 3"):
        ck.restore(reopened, 3, target)
    reopened.close()
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        ck.restore(ck.make_manager(tmp_path / "empty"), None, target)


def test_async_save_then_wait(tmp_path):
    state = random_state(5)
    manager = ck.make_manager(tmp_path / "ckpt")
    ck.save(manager, 1, state, {}, block=False)
    ck.wait(manager)
    got, extra = ck.restore(manager, 1, ck.abstract_target(state))
    assert_states_bitwise_equal(got, state)
    assert extra == {}
    manager.close()


# ------------------------------------------------------------------------------------------
# 8 fake CPU devices, in a subprocess so that every other test keeps seeing one device.


def _eight_device_check():
    import tempfile

    from jax.sharding import PartitionSpec as P

    from trb_jax import sharding

    assert jax.device_count() == 8
    state = random_state(1)  # on device 0 only
    mesh = sharding.make_mesh(data=2, fsdp=4, tensor=1)
    shardings = ts.state_shardings(CONFIG, mesh, jax.eval_shape(lambda: state))
    with tempfile.TemporaryDirectory() as tmp:
        # 1 device -> 8 devices, fsdp.
        one = ck.make_manager(f"{tmp}/one")
        ck.save(one, 1, state, EXTRA)
        got, extra = ck.restore(one, 1, ck.abstract_target(jax.eval_shape(lambda: state), shardings))
        assert extra == EXTRA
        assert_states_bitwise_equal(got, state)
        q = got.params["layers"]["q_dnh"]
        assert q.sharding.spec[1] == "fsdp" and len(q.sharding.device_set) == 8, q.sharding
        assert q.addressable_shards[0].data.shape == (2, 32 // 4, 4, 8)
        mu = got.opt_state[1][0].mu["layers"]["q_dnh"]
        assert mu.sharding == q.sharding
        # 8 devices, fsdp -> 1 device (and onto a different 8-device mesh).
        eight = ck.make_manager(f"{tmp}/eight")
        ck.save(eight, 2, got, {"from": "fsdp4"})
        single = ck.abstract_target(jax.eval_shape(lambda: state))  # SingleDeviceSharding
        back, extra = ck.restore(eight, None, single)
        assert extra == {"from": "fsdp4"}
        assert_states_bitwise_equal(back, state)
        assert len(back.params["embed_vd"].sharding.device_set) == 1
        other = sharding.make_mesh(data=1, fsdp=2, tensor=4)
        other_sh = ts.state_shardings(CONFIG, other, jax.eval_shape(lambda: state))
        moved, _ = ck.restore(eight, 2, ck.abstract_target(jax.eval_shape(lambda: state), other_sh))
        assert_states_bitwise_equal(moved, state)
        assert moved.params["layers"]["q_dnh"].sharding.spec == P(None, "fsdp", "tensor", None)
        one.close(), eight.close()
    print("EIGHT_DEVICE_CHECKPOINT_OK")


def test_checkpoint_moves_between_meshes_on_8_cpu_devices():
    run_on_fake_devices("test_checkpointing", "_eight_device_check", "EIGHT_DEVICE_CHECKPOINT_OK")


# --------------------------------------------------------------------- damaged checkpoints


def _damage(directory, step, how):
    import os
    import shutil

    root = os.path.join(directory, str(step))
    if how == "extra_missing":  # the data position is gone (a copy interrupted mid-way)
        shutil.rmtree(os.path.join(root, "extra"))
    else:  # every array file truncated to nothing (a full disk, a torn copy)
        for dirpath, _, files in os.walk(os.path.join(root, "state")):
            for name in files:
                open(os.path.join(dirpath, name), "wb").close()


@pytest.mark.parametrize("how", ["extra_missing", "arrays_truncated"])
def test_restore_newest_good_skips_a_damaged_latest(tmp_path, how):
    state = random_state(0)
    manager = ck.make_manager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None)
    ck.save(manager, 2, state, EXTRA)
    ck.save(manager, 4, random_state(1), EXTRA)
    manager.close()
    _damage(tmp_path / "ckpt", 4, how)
    manager = ck.make_manager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None)
    step, got, extra, skipped = ck.restore_newest_good(manager, ck.abstract_target(state))
    assert step == 2 and extra == EXTRA
    assert_states_bitwise_equal(got, state)
    assert [s for s, _ in skipped] == [4] and "\n" not in skipped[0][1] and skipped[0][1]
    moved = ck.set_aside(tmp_path / "ckpt", 4, tmp_path / "damaged")
    assert moved == str(tmp_path / "damaged" / "4")
    manager.close()
    assert ck.all_steps(ck.make_manager(tmp_path / "ckpt")) == [2]


def test_restore_newest_good_rejects_nan_bytes_through_validate(tmp_path):
    """A checkpoint that restores but holds NaN weights is rejected by the caller's check."""
    good, bad = random_state(0), random_state(1)
    bad = bad.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), bad.params))
    manager = ck.make_manager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None)
    ck.save(manager, 1, good, EXTRA)
    ck.save(manager, 2, bad, EXTRA)

    def validate(state, extra):
        paths = ck.nonfinite_paths(state)
        if paths:
            raise FloatingPointError(f"NaN/inf in {paths[0]}")

    step, got, _, skipped = ck.restore_newest_good(manager, ck.abstract_target(good), validate)
    assert step == 1
    assert skipped[0][0] == 2 and skipped[0][1].startswith("FloatingPointError: NaN/inf in .params")
    assert ck.nonfinite_paths(got) == []
    assert len(ck.nonfinite_paths(bad.params)) == len(jax.tree.leaves(bad.params))
    manager.close()


def test_restore_newest_good_when_nothing_restores(tmp_path):
    manager = ck.make_manager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None)
    ck.save(manager, 3, random_state(0), EXTRA)
    manager.close()
    _damage(tmp_path / "ckpt", 3, "arrays_truncated")
    manager = ck.make_manager(tmp_path / "ckpt", save_interval_steps=1, max_to_keep=None)
    step, state, extra, skipped = ck.restore_newest_good(manager, ck.abstract_target(random_state(0)))
    assert (step, state, extra) == (None, None, None) and [s for s, _ in skipped] == [3]
    manager.close()
