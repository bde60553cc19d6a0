"""Logical-axis sharding rules (trb_jax.sharding) and a sharded Qwen3 forward on 8 fake CPUs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from fake_devices import run_on_fake_devices
from trb_jax import rollout, sharding
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


# ------------------------------------------------------------------------------------------
# Scale-out: mesh configuration, rule overrides, and on 8 fake CPU devices the
# sharded train step / rollout / init / checkpoint loading against one device.

# Tiny student/teacher pair whose sharded dims divide 8 (so FSDP over 8 devices splits them).
SMALL_S = qwen3.Qwen3Config(
    vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
    intermediate_size=64, tie_word_embeddings=False, rope_theta=10_000.0,
)  # fmt: skip
SMALL_T = qwen3.Qwen3Config(
    vocab_size=128, hidden_size=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
    intermediate_size=64, tie_word_embeddings=True, rope_theta=10_000.0,
)  # fmt: skip
SB, SP, SPT, ST, SK = 8, 5, 6, 6, 16  # rows, student / teacher prompt width, response, top-k


def small_params(config, seed):
    rng = np.random.default_rng(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray(rng.normal(1.0 if "norm" in jax.tree_util.keystr(path) else 0.0, 0.3, s), jnp.float32),
        qwen3.param_shapes(config),
        is_leaf=lambda x: isinstance(x, tuple) and all(isinstance(i, int) for i in x),
    )  # fmt: skip


def small_train_config(lr=1e-5):
    from trb_jax import train_step as ts

    return ts.TrainConfig(student=SMALL_S, teacher=SMALL_T, top_k=SK, chunk_size=4,
                          optim=ts.OptimConfig(peak_lr=lr, decay_steps=100))  # fmt: skip


def small_batch_arrays(seed=0, b=SB):
    """Host (NumPy) fields of a teacher-mode and a stored-mode batch with the same rows."""
    rng = np.random.default_rng(seed)
    resp = rng.integers(10, 128, size=(b, ST)).astype(np.int32)
    resp_mask = np.arange(ST)[None] < rng.integers(1, ST + 1, size=b)[:, None]

    def prompt(width):
        ids = rng.integers(10, 128, size=(b, width)).astype(np.int32)
        mask = np.ones((b, width), np.int32)
        for row in range(b):
            pad = rng.integers(0, width - 1)
            ids[row, :pad], mask[row, :pad] = 0, 0
        return ids, mask

    (sp, sm), (tp, tm) = prompt(SP), prompt(SPT)
    ones = np.ones((b, ST), np.int32)
    common = dict(input_ids_bs=np.concatenate([sp, resp], 1), attention_mask_bs=np.concatenate([sm, ones], 1),
                  response_mask_bt=resp_mask)  # fmt: skip
    teacher = dict(common, teacher_input_ids_bs=np.concatenate([tp, resp], 1),
                   teacher_attention_mask_bs=np.concatenate([tm, ones], 1))  # fmt: skip
    ids = np.argsort(rng.random((b, ST, 128)), axis=-1)[..., :SK].astype(np.int32)
    logp = np.log(rng.dirichlet(np.ones(SK), size=(b, ST)).astype(np.float32) * 0.9)
    stored = dict(common, topk_ids_btk=ids, topk_teacher_logprob_btk=logp)
    return teacher, stored


def test_mesh_shape_resolution_and_rule_overrides():
    assert sharding.resolve_mesh_shape(8, fsdp=-1) == (1, 8, 1)
    assert sharding.resolve_mesh_shape(16, data=2, fsdp=-1, tensor=2) == (2, 4, 2)
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        sharding.resolve_mesh_shape(8, data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="but 8 are available"):
        sharding.resolve_mesh_shape(8, data=2, fsdp=2)
    with pytest.raises(ValueError, match="not divisible"):
        sharding.resolve_mesh_shape(8, data=3, fsdp=-1)
    assert sharding.make_mesh(fsdp=-1).shape == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    # The teacher's inference rules: "embed" replicated, tensor parallelism kept.
    inf = sharding.INFERENCE_AXIS_RULES
    assert sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), (2, 32, 4, 8), MESH_SHAPE, inf) == P(None, None, "tensor", None)
    assert dict(inf)["batch"] == dict(sharding.LOGICAL_AXIS_RULES)["batch"]
    with pytest.raises(KeyError, match="no rule to override"):
        sharding.override_rules(sharding.LOGICAL_AXIS_RULES, nonsense=None)
    # KV cache and decode-state rules (abstract only, no devices needed).
    cache = qwen3.KVCache(*(jax.ShapeDtypeStruct(s, jnp.float32) for s in [(2, 8, 12, 2, 8)] * 2),
                          jax.ShapeDtypeStruct((8, 12), bool), jax.ShapeDtypeStruct((8,), jnp.int32),
                          jax.ShapeDtypeStruct((), jnp.int32))  # fmt: skip
    mesh = sharding.make_mesh()
    sh = qwen3.kv_cache_shardings(mesh, cache)
    assert sh.k_lbskh.spec == P(None, ("data", "fsdp"), None, "tensor", None)
    assert sh.valid_bs.spec == P(("data", "fsdp"), None) and sh.index.spec == P()
    sds = jax.ShapeDtypeStruct
    state = rollout.DecodeState(
        step=sds((), jnp.int32), done_b=sds((8,), bool), token_b=sds((8,), jnp.int32),
        s_logits_bv=sds((8, 128), jnp.float32), t_logits_bv=None, s_cache=cache, t_cache=None,
        rng_b=sds((8, 2), jnp.uint32), out={"tokens_bt": sds((8, 6), jnp.int32)})  # fmt: skip
    dsh = rollout.decode_state_shardings(mesh, state)
    assert dsh.s_cache.k_lbskh.spec == sh.k_lbskh.spec and dsh.t_cache is None
    assert dsh.s_logits_bv.spec == P(("data", "fsdp"), "tensor") and dsh.t_logits_bv is None
    assert dsh.step.spec == P() and dsh.done_b.spec == P(("data", "fsdp"))
    assert dsh.out["tokens_bt"].spec == P(("data", "fsdp"), None)


def _eight_device_train_step_check():
    from trb_jax import train_step as ts

    assert jax.device_count() == 8
    cfg = small_train_config()
    params_s, params_t = small_params(SMALL_S, 1), small_params(SMALL_T, 2)
    teacher_np, stored_np = small_batch_arrays(0)
    batches = {"teacher": ts.Batch(**teacher_np), "stored": ts.Batch(**stored_np)}

    def fresh():  # new buffers every time: a step donates the state (the key included)
        return ts.init_train_state(jax.tree.map(jnp.copy, params_s), cfg, jax.random.key(0))

    step = ts.jit_train_step(cfg)
    want = {}
    for mode, batch in batches.items():
        state, metrics = step(fresh(), batch, params_t if mode == "teacher" else None)
        want[mode] = jax.tree.map(np.asarray, (state.params, metrics, state.opt_state[1][0].mu))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    state_sh = ts.state_shardings(cfg, mesh, jax.eval_shape(fresh))
    teacher_sh = qwen3.param_shardings(SMALL_T, mesh, rules=sharding.INFERENCE_AXIS_RULES)
    params_t_sh = jax.device_put(params_t, teacher_sh)
    assert params_t_sh["layers"]["q_dnh"].sharding.spec == P(None, None, "tensor", None)
    for mode, batch in batches.items():
        batch_sh = ts.batch_shardings(mesh, batch)
        sstep = ts.jit_train_step(cfg, mesh=mesh, state_sharding=state_sh, batch_sharding=batch_sh,
                                  teacher_sharding=teacher_sh if mode == "teacher" else None)  # fmt: skip
        state = sharding.init_sharded(fresh, out_shardings=state_sh)
        state, metrics = sstep(state, jax.device_put(batch, batch_sh), params_t_sh if mode == "teacher" else None)
        want_params, want_metrics, want_mu = want[mode]
        for name, value in want_metrics.items():
            np.testing.assert_allclose(metrics[name], value, rtol=1e-5, atol=1e-6, err_msg=f"{mode} {name}")
        for g, w in zip(jax.tree.leaves(state.params), jax.tree.leaves(want_params)):
            np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5)
        for g, w in zip(jax.tree.leaves(state.opt_state[1][0].mu), jax.tree.leaves(want_mu)):
            np.testing.assert_allclose(g, w, atol=1e-5 * np.abs(w).max() + 1e-12)
        print(f"train step {mode}: loss {float(metrics['loss']):.6f} == {float(want_metrics['loss']):.6f}")
    print("EIGHT_DEVICE_TRAIN_STEP_MODES_OK")


def test_sharded_train_step_both_modes_equal_one_device_on_8_cpu_devices():
    run_on_fake_devices("test_sharding", "_eight_device_train_step_check", "EIGHT_DEVICE_TRAIN_STEP_MODES_OK")


def _eight_device_rollout_check():
    from trb_jax import behaviors
    from trb_jax import rollout as R
    from trb_jax.blending import EosMap

    assert jax.device_count() == 8
    params_s, params_t = small_params(SMALL_S, 1), small_params(SMALL_T, 2)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    params_t_sh = jax.device_put(params_t, qwen3.param_shardings(SMALL_T, mesh, rules=sharding.INFERENCE_AXIS_RULES))
    # The TRB rollout: same tokens, same per-token statistics.
    eos = EosMap.from_ids([1, 2], [3], stop_id=1)
    spec = R.RolloutSpec("trb", 6, eos, 2, 3, top_k=SK)
    rs = np.random.default_rng(3)
    s_ids, s_mask = R.pad_prompts([list(rs.integers(10, 128, size=n)) for n in (3, 5, 7, 4, 6, 9, 2, 5)])
    t_ids, t_mask = R.pad_prompts([list(rs.integers(10, 128, size=n)) for n in (4, 6, 8, 5, 7, 10, 3, 6)])
    prompts = R.Prompts(*(jnp.asarray(x) for x in (s_ids, s_mask, t_ids, t_mask)))
    keys = R.row_keys(jax.random.key(5), np.arange(SB))
    knobs = behaviors.make_knobs(eps=0.05)
    kw = dict(student_config=SMALL_S, teacher_config=SMALL_T, spec=spec)
    want_r = jax.tree.map(np.asarray, R.rollout(params_s, params_t, prompts, keys, knobs, **kw))
    student_sh = qwen3.param_shardings(SMALL_S, mesh)
    with jax.set_mesh(mesh):
        got_r = R.rollout(jax.device_put(params_s, student_sh), params_t_sh,
                          jax.device_put(prompts, sharding.batch_tree_shardings(mesh, prompts)),
                          jax.device_put(keys, sharding.batch_tree_shardings(mesh, keys)), knobs, **kw)  # fmt: skip
    assert len(got_r.tokens_bt.sharding.device_set) == 8
    got_r = jax.tree.map(np.asarray, got_r)
    np.testing.assert_array_equal(got_r.tokens_bt, want_r.tokens_bt)
    np.testing.assert_array_equal(got_r.response_mask_bt, want_r.response_mask_bt)
    np.testing.assert_array_equal(got_r.topk_ids_btk, want_r.topk_ids_btk)
    assert 0 < want_r.beta_bt[want_r.response_mask_bt].mean() < 1  # the blend is active
    for name in ("behavior_logprob_bt", "student_logprob_bt", "teacher_logprob_bt", "beta_bt", "kl_bt",
                 "topk_teacher_logprob_btk"):  # fmt: skip
        g, w = getattr(got_r, name), getattr(want_r, name)
        m = want_r.response_mask_bt if g.ndim == 2 else want_r.response_mask_bt[..., None].repeat(SK, -1)
        np.testing.assert_allclose(g[m], w[m], atol=1e-5, rtol=1e-5, err_msg=name)
    print("EIGHT_DEVICE_ROLLOUT_OK")


def test_sharded_trb_rollout_equals_one_device_on_8_cpu_devices():
    run_on_fake_devices("test_sharding", "_eight_device_rollout_check", "EIGHT_DEVICE_ROLLOUT_OK")


def _eight_device_memory_and_loading_check():
    import tempfile

    from trb_jax.models import checkpoint

    assert jax.device_count() == 8
    # Shape-first init over pure FSDP: each device holds ~1/8 of the parameter bytes.
    mesh = sharding.make_mesh(fsdp=-1)
    init = lambda k: qwen3.init_params(SMALL_S, k)  # noqa: E731
    params = sharding.init_sharded(init, jax.random.key(0), out_shardings=qwen3.param_shardings(SMALL_S, mesh))
    per_device = sharding.per_device_bytes(params)
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    replicated = sum(x.nbytes for x in jax.tree.leaves(params) if x.sharding.is_fully_replicated)
    assert len(per_device) == 8
    for nbytes in per_device.values():  # norms (replicated) are the only excess over total / 8
        assert total / 8 <= nbytes <= total / 8 + replicated, (nbytes, total, replicated)
    assert replicated < 0.02 * total
    print(f"fsdp=8: {total} parameter bytes in all, {max(per_device.values())} per device")
    # Same values as an unsharded init (threefry is partitionable: sharding does not change draws).
    for g, w in zip(jax.tree.leaves(params), jax.tree.leaves(jax.jit(init)(jax.random.key(0)))):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))

    # Sharded HF loading reads each process's blocks only and equals the whole load bitwise.
    for config, dtype, rules in ((SMALL_S, "float32", sharding.LOGICAL_AXIS_RULES),
                                 (SMALL_T, "bfloat16", sharding.INFERENCE_AXIS_RULES)):  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            src = small_params(config, 7)
            checkpoint.save_pretrained(qwen3.Qwen3CausalLM(src, config.with_dtype(dtype)), tmp, max_shard_bytes=20_000)
            whole = checkpoint.from_pretrained(tmp, dtype=dtype)
            mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
            got = checkpoint.from_pretrained(tmp, dtype=dtype, mesh=mesh, rules=rules)
            want_sh = qwen3.param_shardings(config, mesh, rules=rules)
            for g, w, s in zip(jax.tree.leaves(got.params), jax.tree.leaves(whole.params), jax.tree.leaves(want_sh)):
                assert g.sharding == s and g.dtype == w.dtype
                np.testing.assert_array_equal(np.asarray(g).astype(np.float32), np.asarray(w).astype(np.float32))
    # Element count read by a pure-FSDP load: every element exactly once (no whole-tensor reads).
    from safetensors import safe_open

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save_pretrained(qwen3.Qwen3CausalLM(small_params(SMALL_S, 8), SMALL_S), tmp)
        mesh = sharding.make_mesh(fsdp=-1)
        read = {}
        with safe_open(f"{tmp}/model.safetensors", framework="numpy") as handle:
            shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}

            def load_slice(name, idx):
                block = handle.get_slice(name)[idx]
                read[name] = read.get(name, 0) + block.size
                return block

            checkpoint.sharded_params_from_hf(shapes, load_slice, SMALL_S, qwen3.param_shardings(SMALL_S, mesh))
        for name, shape in shapes.items():
            assert read[name] == int(np.prod(shape)), (name, read[name], shape)
    print("EIGHT_DEVICE_MEMORY_LOADING_OK")


def test_fsdp_memory_init_and_sharded_loading_on_8_cpu_devices():
    run_on_fake_devices("test_sharding", "_eight_device_memory_and_loading_check", "EIGHT_DEVICE_MEMORY_LOADING_OK")
