"""Numeric parity of trb_jax.models.qwen3 with transformers' PyTorch Qwen3 on tiny random models."""

import collections
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen3 import modeling_qwen3

from tiny_qwen3 import TINY_VARIANTS, hf_logits, left_padded_batch, tiny_hf_model
from trb_jax.models import checkpoint, qwen3


def _params_from_torch(model, dtype="float32"):
    hf_cfg = model.config.to_dict()
    config = checkpoint.config_from_hf(hf_cfg, param_dtype=dtype)
    state = {k: v.float().numpy() for k, v in model.state_dict().items()}
    state = {k: v for k, v in state.items() if not (config.tie_word_embeddings and k == "lm_head.weight")}
    params = checkpoint.params_from_hf({k: v.shape for k, v in state.items()}, state.__getitem__, config)
    return params, config


# Every attention implementation that runs on CPU. "auto" on CPU is "xla" at these lengths;
# "blockwise" uses 4-token blocks so 12-token sequences and 16-slot caches span several blocks.
CPU_ATTENTION = {"xla": {"attention": "xla"},
                 "blockwise": {"attention": "blockwise", "attention_block_size": 4}}


@pytest.fixture(scope="module", params=list(TINY_VARIANTS))
def hf_pair(request):
    model = tiny_hf_model(seed=0, **TINY_VARIANTS[request.param])
    params, config = _params_from_torch(model)
    return model, params, config


@pytest.fixture(scope="module", params=list(CPU_ATTENTION))
def pair(request, hf_pair):
    """(HF float32 model, our params, our config) for one attention/tying variant and one CPU
    attention implementation."""
    model, params, config = hf_pair
    return model, params, dataclasses.replace(config, **CPU_ATTENTION[request.param])


def _t(x):
    return torch.tensor(np.asarray(x, np.float32))


def _max_rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


def _cos_sin(model, x_bt_, positions_bt):
    return model.model.rotary_emb(x_bt_, torch.tensor(np.asarray(positions_bt), dtype=torch.long))


# ------------------------------------------------------------------------------------------
# Components


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_hf(dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 5, 24)).astype(np.float32) * 3
    w = (1 + 0.3 * rng.normal(size=24)).astype(np.float32)
    ref = modeling_qwen3.Qwen3RMSNorm(24, eps=1e-6).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(_t(w))
        want = ref(_t(x).to(dtype)).float().numpy()
    jdt = jnp.float32 if dtype == torch.float32 else jnp.bfloat16
    got = qwen3.rms_norm(jnp.asarray(x, jdt), jnp.asarray(w, jdt), 1e-6)
    assert got.dtype == jdt
    # bf16 goes through the same cast order as HF, so it matches to the last bit too.
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("theta", [10_000.0, 1_000_000.0])
def test_rope_matches_hf(theta):
    model = tiny_hf_model(seed=0, rope_parameters={"rope_type": "default", "rope_theta": theta})
    head_dim = model.config.head_dim
    rng = np.random.default_rng(1)
    positions = np.stack([np.arange(7), np.arange(7) + 300])
    x = rng.normal(size=(2, 7, 3, head_dim)).astype(np.float32)
    cos, sin = _cos_sin(model, _t(x), positions)
    want, _ = modeling_qwen3.apply_rotary_pos_emb(
        _t(x).transpose(1, 2), _t(x).transpose(1, 2), cos, sin
    )
    cos_j, sin_j = qwen3.rope_cos_sin(jnp.asarray(positions), head_dim, theta, jnp.float32)
    np.testing.assert_allclose(np.asarray(cos_j), cos.numpy(), atol=2e-6)
    np.testing.assert_allclose(np.asarray(sin_j), sin.numpy(), atol=2e-6)
    got = qwen3.apply_rope(jnp.asarray(x), cos_j, sin_j)
    np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), atol=1e-5)


_attention = jax.jit(qwen3.attention, static_argnames="config")
_decoder_layer = jax.jit(qwen3.decoder_layer, static_argnames="config")


def _layer_inputs(model, seed=2, t=9):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, t, model.config.hidden_size)).astype(np.float32)
    positions = np.broadcast_to(np.arange(t), (2, t))
    return x, positions, np.ones((2, t), np.int32)


def test_attention_matches_hf(pair):
    model, params, config = pair
    x, positions, mask = _layer_inputs(model)
    with torch.inference_mode():
        want, _ = model.model.layers[0].self_attn(
            _t(x), position_embeddings=_cos_sin(model, _t(x), positions), attention_mask=None
        )
    lp = qwen3.layer_params(params, 0)
    got = _attention(lp, config, jnp.asarray(x), jnp.asarray(positions), jnp.asarray(mask))
    assert _max_rel_err(got, want.numpy()) <= 1e-5


def test_mlp_matches_hf(hf_pair):
    model, params, _ = hf_pair
    x, _, _ = _layer_inputs(model)
    with torch.inference_mode():
        want = model.model.layers[1].mlp(_t(x)).numpy()
    got = jax.jit(qwen3.mlp)(qwen3.layer_params(params, 1), jnp.asarray(x))
    assert _max_rel_err(got, want) <= 1e-5


def test_decoder_layer_matches_hf(pair):
    model, params, config = pair
    x, positions, mask = _layer_inputs(model)
    with torch.inference_mode():
        want = model.model.layers[1](
            _t(x),
            attention_mask=None,
            position_ids=torch.tensor(positions, dtype=torch.long),
            position_embeddings=_cos_sin(model, _t(x), positions),
        )
    want = (want[0] if isinstance(want, tuple) else want).numpy()
    lp = qwen3.layer_params(params, 1)
    got = _decoder_layer(lp, config, jnp.asarray(x), jnp.asarray(positions), jnp.asarray(mask))
    assert _max_rel_err(got, want) <= 1e-5


# ------------------------------------------------------------------------------------------
# Whole model


_forward = qwen3.forward_jit
BATCH_LENGTHS = [12, 7, 3]  # every forward call uses [3, 12] ids and a mask: one compile per config


def _forward_logits(params, config, ids, mask):
    return np.asarray(_forward(params, config, jnp.asarray(ids), jnp.asarray(mask)))


def test_forward_float32_matches_hf(pair):
    model, params, config = pair
    ids = np.random.default_rng(3).integers(0, config.vocab_size, size=(3, 12)).astype(np.int32)
    want = hf_logits(model, ids)
    got = _forward(params, config, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
    assert got.shape == want.shape and got.dtype == jnp.float32
    assert _max_rel_err(got, want) <= 1e-4


def test_forward_left_padded_matches_hf(pair):
    model, params, config = pair
    ids, mask = left_padded_batch(np.random.default_rng(4), BATCH_LENGTHS, config.vocab_size)
    want = hf_logits(model, ids, mask)
    got = _forward_logits(params, config, ids, mask)
    real = mask.astype(bool)
    assert np.isfinite(got).all()
    assert np.max(np.abs(got[real] - want[real])) <= 1e-4 * np.max(np.abs(want[real]))
    # A left-padded row gives the same logits as the same prompt unpadded (padding on the right
    # of a causal model cannot influence earlier tokens).
    shifted, shifted_mask = ids.copy(), np.ones_like(mask)
    shifted[1, :7] = ids[1, -7:]
    alone = _forward_logits(params, config, shifted, shifted_mask)
    np.testing.assert_allclose(got[1, -7:], alone[1, :7], atol=1e-5 * np.abs(alone).max())


def _log_softmax(x):
    x = np.asarray(x, np.float64)
    return x - np.logaddexp.reduce(x, axis=-1, keepdims=True)


@pytest.mark.parametrize("impl", list(CPU_ATTENTION))
@pytest.mark.parametrize("variant", ["gqa2_tied_hd16", "gqa4_untied_hd4"])
def test_forward_bfloat16_kl_to_hf(variant, impl):
    model = tiny_hf_model(seed=0, **TINY_VARIANTS[variant])
    hf_bf16 = tiny_hf_model(seed=0, **TINY_VARIANTS[variant]).to(torch.bfloat16)
    params, config = _params_from_torch(hf_bf16, dtype="bfloat16")
    config = dataclasses.replace(config, **CPU_ATTENTION[impl])
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
    ids = np.random.default_rng(5).integers(0, config.vocab_size, size=(3, 12)).astype(np.int32)
    want = hf_logits(hf_bf16, ids)
    got = _forward(params, config, jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32))
    assert got.dtype == jnp.float32
    p_log, q_log = _log_softmax(want), _log_softmax(got)
    kl = np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)
    assert kl.max() <= 1e-2
    # ... and bf16 really differs from the float32 reference (the dtype policy took effect).
    assert np.abs(np.asarray(got) - hf_logits(model, ids)).max() > 1e-4


# ------------------------------------------------------------------------------------------
# KV cache


_prefill = jax.jit(qwen3.prefill, static_argnames=("config", "cache_len"))
_DECODE_TRACES: collections.Counter = collections.Counter()


def _counted_decode_step(params, config, token_b, cache):
    _DECODE_TRACES[config] += 1  # runs at trace time only
    return qwen3.decode_step(params, config, token_b, cache)


_decode_step = jax.jit(_counted_decode_step, static_argnames="config", donate_argnames="cache")


@pytest.mark.parametrize("with_padding", [False, True])
def test_cached_decode_equals_full_forward(pair, with_padding):
    _, params, config = pair
    lengths = [5, 2, 4] if with_padding else [5, 5, 5]
    prompt, prompt_mask = left_padded_batch(np.random.default_rng(6), lengths, config.vocab_size)
    steps = 7  # prompt 5 + 7 = 12 tokens: the same forward shape as the other tests
    cont = np.random.default_rng(7).integers(1, config.vocab_size, size=(3, steps)).astype(np.int32)
    ids = np.concatenate([prompt, cont], axis=1)
    mask = np.concatenate([prompt_mask, np.ones_like(cont)], axis=1)
    full = np.asarray(_forward(params, config, jnp.asarray(ids), jnp.asarray(mask)))

    logits, cache = _prefill(params, config, jnp.asarray(prompt), jnp.asarray(prompt_mask), cache_len=16)
    t0 = prompt.shape[1]
    np.testing.assert_allclose(np.asarray(logits), full[:, t0 - 1], atol=1e-5)
    for i in range(steps):
        logits, cache = _decode_step(params, config, jnp.asarray(cont[:, i]), cache)
        np.testing.assert_allclose(np.asarray(logits), full[:, t0 + i], atol=1e-5)
    assert int(cache.index) == t0 + steps
    np.testing.assert_array_equal(np.asarray(cache.next_position_b), np.asarray(lengths) + steps)
    # Every step (and both padding cases) reused one compilation: index/positions are traced.
    assert _DECODE_TRACES[config] == 1


def test_kv_cache_layout_and_errors():
    config = qwen3.Qwen3Config(
        vocab_size=64, hidden_size=16, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=32, tie_word_embeddings=True, compute_dtype="bfloat16",
    )  # fmt: skip
    abstract = jax.eval_shape(functools.partial(qwen3.init_params, config), jax.random.key(0))
    params = jax.tree.map(lambda x: jnp.full(x.shape, 0.1, x.dtype), abstract)
    ids = jnp.ones((2, 4), jnp.int32)
    _, cache = _prefill(params, config, ids, jnp.ones_like(ids), cache_len=10)
    assert cache.k_lbskh.shape == (3, 2, 10, 2, 8) and cache.k_lbskh.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(cache.valid_bs[:, 4:]), False)
    # The cache is a pytree of arrays with the same structure as its logical axes.
    axes = qwen3.kv_cache_logical_axes()
    assert jax.tree.structure(cache) == jax.tree.structure(
        axes, is_leaf=lambda x: isinstance(x, tuple)
    )
    with pytest.raises(ValueError, match="cache_len=3 is shorter than the prompt length 4"):
        qwen3.prefill(params, config, ids, jnp.ones_like(ids), cache_len=3)


def test_config_errors():
    base = dict(vocab_size=8, hidden_size=8, num_layers=1, head_dim=4, intermediate_size=8, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="num_heads=3 is not a multiple of num_kv_heads=2"):
        qwen3.Qwen3Config(num_heads=3, num_kv_heads=2, **base)
    with pytest.raises(ValueError, match="param_dtype='float16'"):
        qwen3.Qwen3Config(num_heads=2, num_kv_heads=2, param_dtype="float16", **base)
    with pytest.raises(ValueError, match="attention='flash'; expected one of"):
        qwen3.Qwen3Config(num_heads=2, num_kv_heads=2, attention="flash", **base)


# ------------------------------------------------------------------------------------------
# Presets


# (total, non-embedding) from the Qwen3 model cards, as printed there.
PUBLISHED = {
    "qwen3_0p6b": ("0.6", "0.44"),
    "qwen3_1p7b": ("1.7", "1.4"),
    "qwen3_4b": ("4.0", "3.6"),
    "qwen3_8b": ("8.2", "6.95"),
    "qwen3_14b": ("14.8", "13.2"),
    "qwen3_32b": ("32.8", "31.2"),
}


def _rounds_to(count: int, published: str) -> bool:
    decimals = len(published.split(".")[1])
    return f"{count / 1e9:.{decimals}f}" == published


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
    config = qwen3.PRESETS[name]
    assert getattr(qwen3, name) is config
    total = qwen3.num_params(config)  # jax.eval_shape of init_params: nothing allocated

    # Independent reference: transformers' own module tree, on the meta device.
    hf_config = transformers.Qwen3Config(**checkpoint.config_to_hf(config))
    with torch.device("meta"):
        hf_model = transformers.Qwen3ForCausalLM(hf_config)
    assert total == sum(p.numel() for p in hf_model.parameters())

    embedding = config.vocab_size * config.hidden_size * (1 if config.tie_word_embeddings else 2)
    published_total, published_non_embedding = PUBLISHED[name]
    assert _rounds_to(total, published_total), (total, published_total)
    assert _rounds_to(total - embedding, published_non_embedding), (total - embedding, published_non_embedding)
    if name == "qwen3_0p6b":
        assert total == 596_049_920


def test_init_params_layout_and_dtype():
    config = qwen3.qwen3_0p6b.with_dtype("bfloat16")
    abstract = jax.eval_shape(functools.partial(qwen3.init_params, config), jax.random.key(0))
    shapes = qwen3.param_shapes(config)
    axes = qwen3.param_logical_axes(config)
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree.structure(abstract) == jax.tree.structure(shapes, is_leaf=is_leaf)
    for x, shape, ax in zip(
        jax.tree.leaves(abstract), jax.tree.leaves(shapes, is_leaf=is_leaf), jax.tree.leaves(axes, is_leaf=is_leaf)
    ):
        assert x.shape == shape and x.dtype == jnp.bfloat16 and len(ax) == len(shape)
    assert "lm_head_dv" not in abstract  # tied
    assert abstract["layers"]["q_dnh"].shape == (28, 1024, 16, 128)
    assert math.prod(abstract["embed_vd"].shape) == 151936 * 1024


@pytest.mark.parametrize("tied", (False, True))
def test_unembed_logits_are_float32_out_of_the_dot(tied):
    """bf16 compute: the LM head's products are accumulated and returned in float32, never
    rounded to bf16 (0.125-nat steps at |logit| in [16, 32), which would quantise the blend's r)."""
    config = qwen3.Qwen3Config(vocab_size=512, hidden_size=64, num_layers=1, num_heads=2,
                               num_kv_heads=1, head_dim=32, intermediate_size=96,
                               tie_word_embeddings=tied).with_dtype("bfloat16")
    params = qwen3.init_params(config, jax.random.key(0))
    name = "embed_vd" if tied else "lm_head_dv"
    params = {**params, name: params[name] * 400}  # logits well past 16
    x_btd = jnp.asarray(np.random.default_rng(0).normal(0, 1, (2, 3, 64)), jnp.bfloat16)
    got = qwen3.unembed(params, config, x_btd)
    normed = np.asarray(qwen3.rms_norm(x_btd, params["final_norm_d"], config.rms_norm_eps), np.float64)
    w = np.asarray(params["embed_vd"], np.float64).T if tied else np.asarray(params["lm_head_dv"], np.float64)
    want = normed @ w
    assert got.dtype == jnp.float32 and np.abs(want).max() > 16
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    rounded = np.asarray(jnp.asarray(want, jnp.bfloat16), np.float64)
    assert np.abs(np.asarray(got, np.float64) - rounded).max() > 1e-2
