"""HF checkpoint loading/saving (trb_jax.models.checkpoint) against transformers itself."""

import json
import shutil

import huggingface_hub
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.numpy import save_file

from tiny_qwen3 import TINY_VARIANTS, hf_logits, tiny_hf_model
from trb_jax.models import checkpoint, qwen3

VARIANTS = ["gqa2_tied_hd16", "gqa4_untied_hd4"]
IDS = np.random.default_rng(0).integers(0, 128, size=(3, 12)).astype(np.int32)


@pytest.fixture(scope="module")
def hf_models():
    return {v: tiny_hf_model(seed=3, **TINY_VARIANTS[v]) for v in VARIANTS}


@pytest.fixture(scope="module")
def saved(hf_models, tmp_path_factory):
    """(variant, sharded) -> directory written by transformers' save_pretrained."""
    out = {}
    for variant, model in hf_models.items():
        for sharded in (False, True):
            path = tmp_path_factory.mktemp(f"{variant}_{'sharded' if sharded else 'single'}")
            model.save_pretrained(path, max_shard_size="20KB" if sharded else "1GB")
            out[variant, sharded] = path
    return out


def _tensor_names(directory):
    names = set()
    for f in directory.glob("*.safetensors"):
        with safe_open(f, framework="numpy") as handle:
            names.update(handle.keys())
    return names


def _rel_err(got, want):
    return float(np.max(np.abs(np.asarray(got) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_from_pretrained_matches_transformers(hf_models, saved, variant, sharded):
    directory = saved[variant, sharded]
    assert (directory / checkpoint.SAFETENSORS_INDEX).exists() == sharded
    num_files = len(list(directory.glob("*.safetensors")))
    assert num_files > 1 if sharded else num_files == 1
    tied = TINY_VARIANTS[variant]["tie_word_embeddings"]
    # Tied Qwen3 checkpoints carry no lm_head.weight, and we keep no separate head.
    assert ("lm_head.weight" in _tensor_names(directory)) == (not tied)

    model = checkpoint.from_pretrained(directory, dtype="float32")
    assert ("lm_head_dv" in model.params) == (not tied)
    logits = model(IDS)
    assert logits.shape == (3, 12, 128) and logits.dtype == jnp.float32
    assert _rel_err(logits, hf_logits(hf_models[variant], IDS)) <= 1e-4
    # The model is a pytree of its params (config static), so it can cross jit boundaries.
    assert len(jax.tree.leaves(model)) == len(jax.tree.leaves(model.params))
    assert jax.tree.structure(model) != jax.tree.structure(
        qwen3.Qwen3CausalLM(model.params, model.config.with_dtype("bfloat16"))
    )


def test_from_pretrained_bfloat16(saved):
    model = checkpoint.from_pretrained(saved["gqa2_tied_hd16", False], dtype=jnp.bfloat16)
    assert model.config.param_dtype == model.config.compute_dtype == "bfloat16"
    assert {x.dtype for x in model.params["layers"].values()} == {jnp.dtype(jnp.bfloat16)}
    assert model(IDS).dtype == jnp.float32
    mixed = checkpoint.from_pretrained(saved["gqa2_tied_hd16", False], dtype="float32", compute_dtype="bfloat16")
    assert mixed.params["embed_vd"].dtype == jnp.float32 and mixed.config.compute_dtype == "bfloat16"


@pytest.mark.parametrize("max_shard_bytes", [2**30, 20_000], ids=["single", "sharded"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_save_pretrained_reloads_in_transformers(hf_models, saved, variant, max_shard_bytes, tmp_path):
    model = checkpoint.from_pretrained(saved[variant, False])
    checkpoint.save_pretrained(model, tmp_path, max_shard_bytes=max_shard_bytes)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "qwen3" and config["architectures"] == ["Qwen3ForCausalLM"]
    assert (tmp_path / checkpoint.SAFETENSORS_INDEX).exists() == (max_shard_bytes < 2**30)
    assert ("lm_head.weight" in _tensor_names(tmp_path)) == (not model.config.tie_word_embeddings)
    assert not list(tmp_path.glob("*.bin"))

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert isinstance(reloaded, transformers.Qwen3ForCausalLM)
    np.testing.assert_array_equal(hf_logits(reloaded, IDS), hf_logits(hf_models[variant], IDS))
    ours_again = checkpoint.from_pretrained(tmp_path)
    np.testing.assert_array_equal(np.asarray(ours_again(IDS)), np.asarray(model(IDS)))


def test_save_pretrained_bfloat16_and_overwrite(saved, tmp_path):
    model = checkpoint.from_pretrained(saved["gqa4_untied_hd4", False], dtype="bfloat16")
    checkpoint.save_pretrained(model, tmp_path, max_shard_bytes=20_000)
    checkpoint.save_pretrained(model, tmp_path)  # a single file replaces the earlier shards
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert reloaded.model.embed_tokens.weight.dtype == torch.bfloat16
    again = checkpoint.from_pretrained(tmp_path, dtype="bfloat16")
    np.testing.assert_array_equal(
        np.asarray(again.params["layers"]["q_dnh"], np.float32),
        np.asarray(model.params["layers"]["q_dnh"], np.float32),
    )


# ------------------------------------------------------------------------------------------
# Config mapping


BASE_HF = dict(
    model_type="qwen3", vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, intermediate_size=48, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip


def test_config_rope_theta_old_and_new_spelling():
    new = checkpoint.config_from_hf({**BASE_HF, "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}})
    old = checkpoint.config_from_hf({**BASE_HF, "rope_theta": 456.0, "rope_scaling": None})
    assert (new.rope_theta, old.rope_theta) == (123.0, 456.0)
    assert new.head_dim == 8  # absent head_dim: hidden / heads
    # Our writer's config reads back identically, also through transformers.
    written = checkpoint.config_to_hf(new)
    assert checkpoint.config_from_hf(written) == new
    assert transformers.Qwen3Config(**written).rope_parameters["rope_theta"] == 123.0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, r"not a Qwen3 checkpoint: config.json has model_type='llama', expected 'qwen3'"),
        ({"use_sliding_window": True}, r"unsupported Qwen3 config: use_sliding_window=True"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0, "factor": 4.0}}, r"rope_type='yarn'"),
        ({"attention_bias": True}, r"unsupported Qwen3 config: attention_bias=True"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(checkpoint.CheckpointError, match=message):
        checkpoint.config_from_hf({**BASE_HF, **change})


# ------------------------------------------------------------------------------------------
# Checkpoint errors: one clear line naming the tensor


def _write_checkpoint(hf_model, directory, edit):
    """Save config.json and a single safetensors file whose tensor dict went through `edit`."""
    directory.mkdir(exist_ok=True)
    hf_model.config.to_json_file(directory / "config.json")
    tensors = {k: v.detach().numpy().copy() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        del tensors["lm_head.weight"]
    edit(tensors)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def _delete(name):
    return lambda t: t.pop(name)


def _add(name, shape):
    return lambda t: t.__setitem__(name, np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    "variant, edit, message",
    [
        ("gqa4_untied_hd4", _delete("model.layers.1.mlp.up_proj.weight"),
         r"^missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight' in /"),
        ("gqa4_untied_hd4", _delete("lm_head.weight"), r"^missing tensor 'lm_head\.weight'"),
        ("gqa2_tied_hd16", _add("model.layers.0.self_attn.q_proj.bias", (64,)),
         r"^unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias' in /"),
        ("gqa4_untied_hd4", _add("model.layers.0.self_attn.q_proj.weight", (24, 32)),
         r"^tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' in \S+ has shape \(24, 32\), expected \(32, 32\)$"),
        ("gqa2_tied_hd16", _add("model.embed_tokens.weight", (128, 16)),
         r"^tensor 'model\.embed_tokens\.weight' in \S+ has shape \(128, 16\), expected \(128, 32\)$"),
    ],
)  # fmt: skip
def test_tensor_errors(hf_models, tmp_path, variant, edit, message):
    directory = _write_checkpoint(hf_models[variant], tmp_path / "ckpt", edit)
    with pytest.raises(checkpoint.CheckpointError, match=message) as info:
        checkpoint.from_pretrained(directory)
    assert "\n" not in str(info.value)


def test_tied_checkpoint_with_redundant_lm_head_loads(hf_models, tmp_path):
    # Some exports of tied models still store lm_head.weight; transformers re-ties it, so do we.
    model = hf_models["gqa2_tied_hd16"]
    head = model.lm_head.weight.detach().numpy().copy()
    directory = _write_checkpoint(model, tmp_path / "ckpt", lambda t: t.__setitem__("lm_head.weight", head))
    assert _rel_err(checkpoint.from_pretrained(directory)(IDS), hf_logits(model, IDS)) <= 1e-4


def test_directory_errors(saved, tmp_path):
    source = saved["gqa2_tied_hd16", True]
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    shutil.copy(source / "config.json", no_weights)
    (no_weights / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(checkpoint.CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json in .*\(pickled \.bin checkpoints are not supported\)"):
        checkpoint.from_pretrained(no_weights)

    no_config = tmp_path / "no_config"
    shutil.copytree(source, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"^no config\.json in "):
        checkpoint.from_pretrained(no_config)

    lost_shard = tmp_path / "lost_shard"
    shutil.copytree(source, lost_shard)
    sorted(lost_shard.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"model\.safetensors\.index\.json in .* names a missing shard 'model-00001-of-"):
        checkpoint.from_pretrained(lost_shard)

    with pytest.raises(checkpoint.CheckpointError, match=r"is a file; expected a checkpoint directory"):
        checkpoint.from_pretrained(source / "config.json")

    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text(json.dumps({**BASE_HF, "model_type": "llama"}))
    with pytest.raises(checkpoint.CheckpointError, match=r"^not a Qwen3 checkpoint: .*model_type='llama'"):
        checkpoint.from_pretrained(llama)


def test_hub_ids_go_through_snapshot_download(saved, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns):
        calls.append((repo_id, allow_patterns))
        return str(saved["gqa2_tied_hd16", False])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = checkpoint.from_pretrained("someone/tiny-qwen3")
    assert calls[0][0] == "someone/tiny-qwen3" and model.config.hidden_size == 32
    assert "*.safetensors" in calls[0][1] and not any("bin" in p for p in calls[0][1])


def test_hub_failure_is_one_clear_line():
    # An invalid repo id fails inside huggingface_hub without touching the network.
    with pytest.raises(checkpoint.CheckpointError, match=r"^'/no/such/dir' is not a local directory and could not be fetched from the Hugging Face Hub: \w+") as info:
        checkpoint.from_pretrained("/no/such/dir")
    assert "\n" not in str(info.value) and info.value.__cause__ is not None


# Sharded loading; the 8-device version is in tests/test_sharding.py.
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sharded_from_pretrained_equals_whole_load(saved, dtype):
    from trb_jax import sharding

    path = saved["gqa4_untied_hd4", True]  # transformers' own multi-file checkpoint
    whole = checkpoint.from_pretrained(path, dtype=dtype)
    mesh = sharding.make_mesh()
    got = checkpoint.from_pretrained(path, dtype=dtype, mesh=mesh)
    assert jax.tree.structure(got.params) == jax.tree.structure(whole.params)
    for g, w in zip(jax.tree.leaves(got.params), jax.tree.leaves(whole.params)):
        assert isinstance(g.sharding, jax.sharding.NamedSharding) and g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    directory = tmp_path / "truncated"
    shutil.copytree(saved["gqa2_tied_hd16", False], directory)
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # a download or copy cut short
    with pytest.raises(checkpoint.CheckpointError, match=rf"^{weights}: not a readable "
                                                         r"safetensors file \(.+\)$"):
        checkpoint.from_pretrained(directory)
