"""Hugging Face Qwen3 checkpoints <-> trb_jax Qwen3 params (safetensors only).

Calling contract:

    model = from_pretrained("Qwen/Qwen3-0.6B" or "/path/to/dir", dtype="bfloat16")
    logits_btv = model(input_ids_bt)          # [b, t] int32 -> [b, t, v] float32
    logits_btv = qwen3.forward(model.params, model.config, input_ids_bt)   # the same, pure
    save_pretrained(model, "/tmp/out")        # transformers.AutoModelForCausalLM loads it

`from_pretrained` reads config.json plus model.safetensors, or a sharded checkpoint with its
model.safetensors.index.json. It never unpickles and never runs remote code. Every failure to
map a checkpoint raises `CheckpointError` (a ValueError) with a one-line message.

All name and layout knowledge lives in the two tables below (`_GLOBAL_TABLE`, `_LAYER_TABLE`).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from trb_jax import errors
from trb_jax import sharding as sharding_lib
from trb_jax.models import qwen3

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
_HUB_PATTERNS = [
    "config.json", "generation_config.json", "*.safetensors", SAFETENSORS_INDEX,
    "tokenizer*", "vocab.json", "merges.txt", "special_tokens_map.json",
]  # fmt: skip
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


class CheckpointError(errors.CheckpointError):
    """A directory, config or tensor that cannot be mapped onto Qwen3 params."""


# Layouts: how a HF torch Linear/Embedding weight maps onto our einsum-friendly array.
#   "same":      identical shape (embeddings, norm scales).
#   "linear":    HF [out, in] -> ours [in, out].
#   "in_heads":  HF [heads*h, d] -> ours [d, heads, h]  (q/k/v projections).
#   "out_heads": HF [d, n*h] -> ours [n, h, d]          (output projection).
_GLOBAL_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.embed_tokens.weight", "embed_vd", "same"),
    ("model.norm.weight", "final_norm_d", "same"),
    ("lm_head.weight", "lm_head_dv", "linear"),  # absent when tie_word_embeddings
)
_LAYER_TABLE: tuple[tuple[str, str, str], ...] = (
    ("model.layers.{i}.input_layernorm.weight", "attn_norm_d", "same"),
    ("model.layers.{i}.self_attn.q_proj.weight", "q_dnh", "in_heads"),
    ("model.layers.{i}.self_attn.k_proj.weight", "k_dkh", "in_heads"),
    ("model.layers.{i}.self_attn.v_proj.weight", "v_dkh", "in_heads"),
    ("model.layers.{i}.self_attn.o_proj.weight", "o_nhd", "out_heads"),
    ("model.layers.{i}.self_attn.q_norm.weight", "q_norm_h", "same"),
    ("model.layers.{i}.self_attn.k_norm.weight", "k_norm_h", "same"),
    ("model.layers.{i}.post_attention_layernorm.weight", "mlp_norm_d", "same"),
    ("model.layers.{i}.mlp.gate_proj.weight", "gate_df", "linear"),
    ("model.layers.{i}.mlp.up_proj.weight", "up_df", "linear"),
    ("model.layers.{i}.mlp.down_proj.weight", "down_fd", "linear"),
)


def _hf_shape(our_shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "same":
        return our_shape
    if layout == "linear":
        return our_shape[::-1]
    if layout == "in_heads":
        d, heads, h = our_shape
        return (heads * h, d)
    if layout == "out_heads":
        n, h, d = our_shape
        return (d, n * h)
    raise AssertionError(layout)


def _to_ours(hf: np.ndarray, our_shape: tuple[int, ...], layout: str) -> np.ndarray:
    if layout == "same":
        return hf
    return hf.T.reshape(our_shape)  # every other layout is "transpose, then split heads"


def _to_hf(ours: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return ours
    if layout == "linear":
        return ours.T
    if layout == "in_heads":
        return ours.reshape(ours.shape[0], -1).T
    if layout == "out_heads":
        return ours.reshape(-1, ours.shape[-1]).T
    raise AssertionError(layout)


def _expected_tensors(config: qwen3.Qwen3Config) -> dict[str, tuple[str, int | None, str, tuple]]:
    """HF tensor name -> (our key, layer index or None, layout, our per-layer shape)."""
    shapes = qwen3.param_shapes(config)
    out = {}
    for name, key, layout in _GLOBAL_TABLE:
        if key in shapes:
            out[name] = (key, None, layout, shapes[key])
    for template, key, layout in _LAYER_TABLE:
        for i in range(config.num_layers):
            out[template.format(i=i)] = (key, i, layout, shapes["layers"][key][1:])
    return out


def _is_ignorable(name: str, config: qwen3.Qwen3Config) -> bool:
    # transformers itself drops these when loading: a tied head is re-tied to the embedding,
    # and inv_freq is a non-persistent buffer some old exports still contain.
    return (config.tie_word_embeddings and name == "lm_head.weight") or name.endswith(
        "rotary_emb.inv_freq"
    )


# ---------------------------------------------------------------------------------------------
# Config


def config_from_hf(
    hf: Mapping[str, Any], *, param_dtype: str = "float32", compute_dtype: str | None = None
) -> qwen3.Qwen3Config:
    """Our Qwen3Config from a HF config.json dict (transformers 4.x or 5.x spelling)."""
    model_type = hf.get("model_type")
    if model_type != "qwen3":
        raise CheckpointError(f"not a Qwen3 checkpoint: config.json has model_type={model_type!r}, expected 'qwen3'")
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    unsupported = {
        "rope_type": (rope_type, "default"),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "use_sliding_window": (hf.get("use_sliding_window", False), False),
    }
    for field, (got, supported) in unsupported.items():
        if got != supported:
            raise CheckpointError(f"unsupported Qwen3 config: {field}={got!r} (only {supported!r} is implemented)")
    num_heads = hf["num_attention_heads"]
    return qwen3.Qwen3Config(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        intermediate_size=hf["intermediate_size"],
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        # transformers 5 keeps rope_theta in rope_parameters; 4.x at the top level.
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0))),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=hf.get("max_position_embeddings", 40960),
        param_dtype=param_dtype,
        compute_dtype=compute_dtype or param_dtype,
    )


def config_to_hf(config: qwen3.Qwen3Config) -> dict[str, Any]:
    """A config.json dict that transformers 4.51+ and 5.x load as Qwen3ForCausalLM."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_layers,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "dtype": config.param_dtype,
        "torch_dtype": config.param_dtype,
        "use_cache": True,
    }


# ---------------------------------------------------------------------------------------------
# Tensors <-> params


def _validate_tensors(
    shapes: Mapping[str, tuple[int, ...]], config: qwen3.Qwen3Config, source: str
) -> dict[str, tuple[str, int | None, str, tuple]]:
    """`_expected_tensors(config)` after checking names and shapes against `shapes`."""
    expected = _expected_tensors(config)
    for name, (_, _, layout, our_shape) in expected.items():
        if name not in shapes:
            raise CheckpointError(f"missing tensor {name!r} in {source}")
        want = _hf_shape(our_shape, layout)
        if tuple(shapes[name]) != want:
            raise CheckpointError(
                f"tensor {name!r} in {source} has shape {tuple(shapes[name])}, expected {want}"
            )
    for name in shapes:
        if name not in expected and not _is_ignorable(name, config):
            raise CheckpointError(f"unexpected tensor {name!r} in {source}")
    return expected


def params_from_hf(
    shapes: Mapping[str, tuple[int, ...]],
    load: Callable[[str], np.ndarray],
    config: qwen3.Qwen3Config,
    *,
    source: str = "checkpoint",
) -> qwen3.Params:
    """Params (config.param_dtype) from HF-named tensors.

    `shapes` lists every tensor available (name -> shape); `load(name)` returns one as a NumPy
    array. All names and shapes are validated before any tensor is loaded.
    """
    expected = _validate_tensors(shapes, config, source)
    np_dtype = _NP_DTYPES[config.param_dtype]
    per_layer: dict[str, list] = {key: [None] * config.num_layers for _, key, _ in _LAYER_TABLE}
    params: qwen3.Params = {}
    for name, (key, layer, layout, our_shape) in expected.items():
        array = _to_ours(np.asarray(load(name)), our_shape, layout).astype(np_dtype)
        if layer is None:
            params[key] = jnp.asarray(array)
        else:
            per_layer[key][layer] = array
    params["layers"] = {key: jnp.asarray(np.stack(arrays)) for key, arrays in per_layer.items()}
    return params


def _read_block(
    load_slice: Callable[[str, tuple[slice, ...]], np.ndarray],
    name: str,
    layout: str,
    our_shape: tuple[int, ...],
    index: tuple[slice, ...],
) -> np.ndarray:
    """Our-layout block `index` of one HF tensor, reading only the HF rows/columns it needs.

    `index` has one slice per dimension of `our_shape` (step 1, as shardings produce).
    """
    full = [range(n)[i] for n, i in zip(our_shape, index)]  # normalised start/stop per dim
    if layout == "same":
        return load_slice(name, tuple(slice(r.start, r.stop) for r in full))
    if layout == "linear":  # ours [in, out] = hf[out, in].T
        (a, b) = full
        return load_slice(name, (slice(b.start, b.stop), slice(a.start, a.stop))).T
    if layout == "in_heads":  # ours [d, heads, h] = hf[heads*h, d].T
        d, n, h = full
        head_dim = our_shape[2]
        hf = load_slice(name, (slice(n.start * head_dim, n.stop * head_dim), slice(d.start, d.stop)))
        return hf.T.reshape(len(d), len(n), head_dim)[:, :, h.start : h.stop]
    if layout == "out_heads":  # ours [n, h, d] = hf[d, n*h].T
        n, h, d = full
        head_dim = our_shape[1]
        hf = load_slice(name, (slice(d.start, d.stop), slice(n.start * head_dim, n.stop * head_dim)))
        return hf.T.reshape(len(n), head_dim, len(d))[:, h.start : h.stop, :]
    raise AssertionError(layout)


def sharded_params_from_hf(
    shapes: Mapping[str, tuple[int, ...]],
    load_slice: Callable[[str, tuple[slice, ...]], np.ndarray],
    config: qwen3.Qwen3Config,
    shardings: qwen3.Params,
    *,
    source: str = "checkpoint",
) -> qwen3.Params:
    """Params as global jax.Arrays laid out by `shardings`, each process reading only its shards.

    `load_slice(name, slices)` returns `tensor[slices]` of one HF tensor (safetensors'
    `get_slice`, which reads just those bytes). Every addressable shard is built by
    `jax.make_array_from_callback` from the HF rows it covers (a stacked [layers, ...] shard
    reads its layers one by one), so host memory holds one shard at a time and a process never
    touches the other processes' shards. Replicated shards on several local devices are read
    once.
    """
    expected = _validate_tensors(shapes, config, source)
    np_dtype = _NP_DTYPES[config.param_dtype]
    by_key: dict[str, dict[int | None, str]] = {}
    for name, (key, layer, _, _) in expected.items():
        by_key.setdefault(key, {})[layer] = name
    layouts = {key: layout for _, key, layout in _GLOBAL_TABLE + _LAYER_TABLE}
    global_shapes = qwen3.param_shapes(config)

    def build(key: str, shape: tuple[int, ...], sharding: Any, stacked: bool):
        names, layout = by_key[key], layouts[key]
        cache: dict[tuple, np.ndarray] = {}

        def callback(index: tuple[slice, ...]) -> np.ndarray:
            index = tuple(index) + (slice(None),) * (len(shape) - len(index))
            bounds = tuple(range(n)[i] for n, i in zip(shape, index))
            cache_key = tuple((r.start, r.stop) for r in bounds)
            if cache_key not in cache:
                if stacked:
                    blocks = [
                        _read_block(load_slice, names[layer], layout, shape[1:], index[1:])
                        for layer in bounds[0]
                    ]
                    block = np.stack(blocks) if blocks else np.zeros((0,) + tuple(len(r) for r in bounds[1:]))
                else:
                    block = _read_block(load_slice, names[None], layout, shape, index)
                cache[cache_key] = np.ascontiguousarray(block.astype(np_dtype))
            return cache[cache_key]

        return jax.make_array_from_callback(shape, sharding, callback)

    params: qwen3.Params = {"layers": {}}
    for key, shape in global_shapes.items():
        if key == "layers":
            continue
        params[key] = build(key, shape, shardings[key], stacked=False)
    for key, shape in global_shapes["layers"].items():
        params["layers"][key] = build(key, shape, shardings["layers"][key], stacked=True)
    return params


def params_to_hf(params: qwen3.Params, config: qwen3.Qwen3Config) -> dict[str, np.ndarray]:
    """HF-named, HF-layout NumPy tensors (param dtype, C-contiguous) for `params`."""
    out = {}
    for name, (key, layer, layout, _) in _expected_tensors(config).items():
        array = params[key] if layer is None else params["layers"][key][layer]
        out[name] = np.ascontiguousarray(_to_hf(np.asarray(array), layout))
    return out


# ---------------------------------------------------------------------------------------------
# Directories


def resolve_checkpoint_dir(path_or_hub_id: str | os.PathLike) -> Path:
    """A local checkpoint directory; a non-directory argument is fetched as a Hub repo id."""
    path = Path(path_or_hub_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{str(path)!r} is a file; expected a checkpoint directory or a Hub id")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path_or_hub_id), allow_patterns=_HUB_PATTERNS))
    except Exception as e:  # noqa: BLE001 - re-raised with a clear message, cause attached
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{str(path_or_hub_id)!r} is not a local directory and could not be fetched from the "
            f"Hugging Face Hub: {type(e).__name__}: {reason}"
        ) from e


def _safetensors_files(directory: Path) -> list[Path]:
    single, index = directory / SAFETENSORS_FILE, directory / SAFETENSORS_INDEX
    if single.is_file():
        return [single]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{SAFETENSORS_INDEX} in {directory} names a missing shard {f.name!r}")
        return files
    hint = " (pickled .bin checkpoints are not supported)" if any(directory.glob("*.bin")) else ""
    raise CheckpointError(f"no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX} in {directory}{hint}")


def from_pretrained(
    path_or_hub_id: str | os.PathLike,
    *,
    dtype: Any = "float32",
    compute_dtype: Any = None,
    mesh: Any = None,
    shardings: Any = None,
    rules: Any = None,
) -> qwen3.Qwen3CausalLM:
    """Load a HF Qwen3 checkpoint (local dir or Hub id) as a callable Qwen3CausalLM.

    dtype is the parameter dtype (float32 or bfloat16, str or jnp dtype); compute_dtype
    defaults to it. The result maps input_ids [b, t] int32 to logits [b, t, v] float32.

    Sharded loading: with `shardings` (a params pytree of jax.sharding.Sharding) or `mesh`
    (shardings from the logical-axis table, `rules` defaulting to
    trb_jax.sharding.LOGICAL_AXIS_RULES; pass INFERENCE_AXIS_RULES for a teacher) every param is
    a global jax.Array built shard by shard from safetensors slices: each process reads only the
    bytes of its own addressable shards (`sharded_params_from_hf`). Without either, params are
    loaded whole onto the default device.
    """
    directory = resolve_checkpoint_dir(path_or_hub_id)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"no config.json in {directory}")
    param_dtype = jnp.dtype(dtype).name
    config = config_from_hf(
        json.loads(config_path.read_text()),
        param_dtype=param_dtype,
        compute_dtype=None if compute_dtype is None else jnp.dtype(compute_dtype).name,
    )
    with contextlib.ExitStack() as stack:
        handles, shapes = {}, {}
        for file in _safetensors_files(directory):
            try:
                handle = stack.enter_context(safe_open(file, framework="numpy"))
            except Exception as e:  # noqa: BLE001  (SafetensorError does not name the file)
                raise CheckpointError(f"{file}: not a readable safetensors file "
                                      f"({' '.join(str(e).split())})") from None
            for name in handle.keys():
                handles[name] = handle
                shapes[name] = tuple(handle.get_slice(name).get_shape())
        if shardings is None and mesh is not None:
            shardings = qwen3.param_shardings(
                config, mesh, rules=rules or sharding_lib.LOGICAL_AXIS_RULES
            )
        if shardings is None:
            params = params_from_hf(
                shapes, lambda name: handles[name].get_tensor(name), config, source=str(directory)
            )
        else:
            params = sharded_params_from_hf(
                shapes, lambda name, idx: handles[name].get_slice(name)[idx], config, shardings,
                source=str(directory),
            )  # fmt: skip
    return qwen3.Qwen3CausalLM(params=params, config=config)


def save_pretrained(
    model: qwen3.Qwen3CausalLM, path: str | os.PathLike, *, max_shard_bytes: int = 5 * 2**30
) -> Path:
    """Write config.json and safetensors that transformers loads as Qwen3ForCausalLM.

    Tensors are stored in the model's param dtype. Above `max_shard_bytes` the weights are split
    into model-0000i-of-0000N.safetensors shards with a model.safetensors.index.json.
    """
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    # Stale weights from an earlier save would shadow (single file) or mix with the new ones.
    for old in [*directory.glob("model*.safetensors"), directory / SAFETENSORS_INDEX]:
        old.unlink(missing_ok=True)
    (directory / "config.json").write_text(json.dumps(config_to_hf(model.config), indent=2) + "\n")
    tensors = params_to_hf(model.params, model.config)
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    metadata = {"format": "pt"}  # transformers refuses safetensors without a known format tag
    if len(shards) == 1:
        save_file(shards[0], directory / SAFETENSORS_FILE, metadata=metadata)
        return directory
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / filename, metadata=metadata)
        weight_map.update({name: filename for name in shard})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    (directory / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return directory
