"""Per-device memory plan and decode roofline for the paper's student <- teacher pairs.

    python scripts/memory_plan.py                 # table on stdout, JSON to benchmarks/results/
    python scripts/memory_plan.py --rows 64 --prompt 1024 --response 8192 --chunk 256

Everything is computed from the model presets (trb_jax.models.qwen3) and the one sharding table
(trb_jax.sharding): each parameter's per-device size is its global shape divided by the mesh
axes its logical axes map to (`logical_to_spec`), so the plan changes when the rules do. No
arrays are created; nothing here has been measured on the hardware it describes.

Choices (stated in the JSON too):
  student   float32 master params, float32 AdamW mu and nu, float32 grads (transient, live at
            the update), bfloat16 compute; sharded by LOGICAL_AXIS_RULES (FSDP over "embed",
            tensor over heads/MLP/vocab).
  teacher   bfloat16, inference only, INFERENCE_AXIS_RULES ("embed" replicated: a decode step
            never all-gathers the teacher; heads/MLP/vocab split over "tensor"); the
            "v5e-8, FSDP teacher" column uses the training rules for it instead.
  rollout   a bfloat16 copy of the student's weights (2 B/param, same sharding as the teacher);
            both KV caches bfloat16 [L, rows, prompt + response, kv_heads, head_dim], rows over
            (data, fsdp), KV heads over tensor.
  train     rows x (prompt + response) tokens, one micro-batch; the layer-remat inputs
            (`TrainConfig.remat_layers`) and one layer's recomputation working set, with the
            current attention (scores [rows, heads, S, S] float32 + probs in bf16) and without
            that term (a flash / splash attention kernel); the loss's logits chunk
            [rows, chunk, V/tensor] float32 x 3 live buffers for the student (logits, log-probs,
            their cotangent) and x 2 for the teacher (teacher mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from trb_jax import sharding  # noqa: E402
from trb_jax.models import qwen3  # noqa: E402

GB = 1e9
RESULTS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "memory_plan.json"


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    devices: int
    hbm_gb: float  # per device
    hbm_tb_s: float  # per device HBM bandwidth
    mesh: tuple[int, int, int]  # (data, fsdp, tensor)
    why: str
    teacher_rules: str = "inference"  # "inference" (embed replicated) or "train" (FSDP too)


HARDWARE = (
    Hardware("8x H100 80GB (SXM)", 8, 80.0, 3.35, (1, 8, 1),
             "pure FSDP for the student; the 4B/8B teacher fits replicated (8 / 16 GB bf16), "
             "so decode needs no weight gathers and rows split 8 ways"),
    Hardware("TPU v5e-8 (16 GB HBM per chip)", 8, 16.0, 0.819, (1, 2, 4),
             "16 GB cannot hold an 8B teacher replicated (16.4 GB bf16): tensor=4 splits the "
             "teacher's heads / MLP / vocab 4 ways (kv_heads 8 divide), fsdp=2 shards the rest"),
    Hardware("TPU v5e-8, FSDP teacher", 8, 16.0, 0.819, (1, 8, 1),
             "alternative: rows split 8 ways (train activations / 4 vs tensor=4), the teacher "
             "FSDP-sharded too (training rules), so every decode step all-gathers the teacher "
             "over ICI: the HBM roofline below does not include that traffic", "train"),
)  # fmt: skip
PAIRS = (("qwen3_0p6b", "qwen3_4b"), ("qwen3_1p7b", "qwen3_8b"))


def _is_shape(x):
    return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def _is_axes(x):
    return isinstance(x, tuple)


def param_elements_per_device(config: qwen3.Qwen3Config, mesh_shape: dict, rules) -> tuple[int, int]:
    """(elements on the busiest device, total elements) of config's params under `rules`."""
    axes = jax.tree.leaves(qwen3.param_logical_axes(config), is_leaf=_is_axes)
    shapes = jax.tree.leaves(qwen3.param_shapes(config), is_leaf=_is_shape)
    per, total = 0, 0
    for ax, shape in zip(axes, shapes):
        spec = sharding.logical_to_spec(ax, shape, mesh_shape, rules)
        n = math.prod(shape)
        split = 1
        for entry in spec:
            for mesh_axis in (entry,) if isinstance(entry, str) else (entry or ()):
                split *= mesh_shape[mesh_axis]
        per += n // split
        total += n
    return per, total


def kv_bytes_per_token(config: qwen3.Qwen3Config, bytes_per=2) -> int:
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * bytes_per


def _split(n: int, ways: int) -> int:
    return n // ways if n % ways == 0 else n  # the rules keep an axis whole when it does not divide


def plan(student_name, teacher_name, hw: Hardware, rows, prompt, response, chunk) -> dict:
    s, t = qwen3.PRESETS[student_name], qwen3.PRESETS[teacher_name]
    data, fsdp, tensor = hw.mesh
    mesh_shape = {"data": data, "fsdp": fsdp, "tensor": tensor}
    rows_local = max(1, rows // (data * fsdp))
    seq = prompt + response
    s_train, s_total = param_elements_per_device(s, mesh_shape, sharding.LOGICAL_AXIS_RULES)
    s_inf, _ = param_elements_per_device(s, mesh_shape, sharding.INFERENCE_AXIS_RULES)
    t_rules = sharding.INFERENCE_AXIS_RULES if hw.teacher_rules == "inference" else sharding.LOGICAL_AXIS_RULES
    t_inf, t_total = param_elements_per_device(t, mesh_shape, t_rules)
    v_local = _split(s.vocab_size, tensor)

    def kv_local(cfg):
        return (kv_bytes_per_token(cfg) // cfg.num_kv_heads * _split(cfg.num_kv_heads, tensor)
                * rows_local * seq)  # fmt: skip

    def layer_working_set(cfg, attention):
        heads = _split(cfg.num_heads, tensor)
        ff = _split(cfg.intermediate_size, tensor)
        d = cfg.hidden_size
        qkv = rows_local * seq * (heads + 2 * _split(cfg.num_kv_heads, tensor)) * cfg.head_dim * 2
        mlp = rows_local * seq * ff * 2 * 3  # gate, up, silu(gate) * up (bf16)
        resid = rows_local * seq * d * 2 * 3
        att = rows_local * heads * seq * seq * (4 + 2) if attention else 0
        return qkv + mlp + resid + att

    items = {
        "student params (f32, FSDP)": 4 * s_train,
        "AdamW mu + nu (f32)": 8 * s_train,
        "grads (f32, transient)": 4 * s_train,
        "teacher params (bf16)": 2 * t_inf,
        "rollout: student bf16 weight copy": 2 * s_inf,
        "rollout: KV caches student + teacher (bf16)": kv_local(s) + kv_local(t),
        "train: remat layer inputs (bf16)": s.num_layers * rows_local * seq * s.hidden_size * 2,
        "train: one layer recompute, no S^2 term": layer_working_set(s, attention=False),
        "train: attention scores+probs of one layer (naive)": layer_working_set(s, True) - layer_working_set(s, False),
        "train: loss chunk logits (student x3 + teacher x2, f32)": rows_local * chunk * v_local * 4 * 5,
        "train: teacher forward hidden + one layer (no S^2 term)": (
            rows_local * seq * t.hidden_size * 2 + layer_working_set(t, attention=False)),
    }
    persistent = sum(items[k] for k in ("student params (f32, FSDP)", "AdamW mu + nu (f32)",
                                         "teacher params (bf16)"))  # fmt: skip
    rollout_peak = persistent + items["rollout: student bf16 weight copy"] + items["rollout: KV caches student + teacher (bf16)"]
    train_flash = (persistent + items["grads (f32, transient)"] + items["train: remat layer inputs (bf16)"]
                   + items["train: one layer recompute, no S^2 term"]
                   + items["train: loss chunk logits (student x3 + teacher x2, f32)"]
                   + items["train: teacher forward hidden + one layer (no S^2 term)"])  # fmt: skip
    train_naive = train_flash + items["train: attention scores+probs of one layer (naive)"]
    hbm = hw.hbm_gb * GB

    # Rows per batch shard that fit in 90% of HBM (the rest scales with rows): the rollout and
    # train micro-batch sizes to run the 64 rows in sequential slices.
    kv_per_row = (kv_local(s) + kv_local(t)) / rows_local
    rollout_rows_fit = max(0, int((hbm * 0.9 - persistent - items["rollout: student bf16 weight copy"]) // kv_per_row))
    fixed = persistent + items["grads (f32, transient)"]
    train_rows_fit_flash = max(0, int((hbm * 0.9 - fixed) // ((train_flash - fixed) / rows_local)))
    train_rows_fit_naive = max(0, int((hbm * 0.9 - fixed) // ((train_naive - fixed) / rows_local)))

    # Decode roofline: one step reads both models' weights (bf16) and, per local row, both KV
    # caches up to the current length (mean over the response: prompt + response / 2).
    mean_len = prompt + response / 2
    kv_read = (kv_local(s) + kv_local(t)) / seq * mean_len
    step_bytes = 2 * s_inf + 2 * t_inf + kv_read
    step_s = step_bytes / (hw.hbm_tb_s * 1e12)
    return {
        "pair": f"{student_name} <- {teacher_name}",
        "hardware": hw.name,
        "mesh": dict(mesh_shape),
        "mesh_why": hw.why,
        "hbm_gb_per_device": hw.hbm_gb,
        "student_params": s_total,
        "teacher_params": t_total,
        "rows": rows, "rows_per_device": rows_local, "prompt": prompt, "response": response,
        "chunk_size": chunk,
        "per_device_gb": {k: round(v / GB, 3) for k, v in items.items()},
        "persistent_gb": round(persistent / GB, 2),
        "rollout_peak_gb": round(rollout_peak / GB, 2),
        "train_peak_gb_flash_attention": round(train_flash / GB, 2),
        "train_peak_gb_naive_attention": round(train_naive / GB, 2),
        "rollout_fits": rollout_peak <= 0.9 * hbm,
        "train_fits_flash": train_flash <= 0.9 * hbm,
        "train_fits_naive": train_naive <= 0.9 * hbm,
        "teacher_rules": hw.teacher_rules,
        "rollout_rows_per_device_that_fit": rollout_rows_fit,
        "train_rows_per_device_that_fit_flash": train_rows_fit_flash,
        "train_rows_per_device_that_fit_naive": train_rows_fit_naive,
        "decode_roofline": {
            "bytes_per_step_gb": round(step_bytes / GB, 3),
            "weights_gb": round((2 * s_inf + 2 * t_inf) / GB, 3),
            "kv_read_gb_mean": round(kv_read / GB, 3),
            "hbm_tb_s": hw.hbm_tb_s,
            "ms_per_step": round(step_s * 1e3, 3),
            "tokens_per_s_per_device": round(rows_local / step_s, 1),
            # Every (data, fsdp) group decodes its own rows; tensor peers share theirs.
            "tokens_per_s_total": round(rows_local / step_s * (data * fsdp), 1),
        },
    }


def table(plans: list[dict]) -> str:
    keys = list(plans[0]["per_device_gb"])
    head = ["GB per device"] + [f"{p['pair']} / {p['hardware'].replace(' (16 GB HBM per chip)', '')}" for p in plans]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| mesh (data, fsdp, tensor) | " + " | ".join(
        f"{p['mesh']['data']}, {p['mesh']['fsdp']}, {p['mesh']['tensor']}" for p in plans) + " |")
    lines.append("| rows per batch shard | " + " | ".join(str(p["rows_per_device"]) for p in plans) + " |")
    for k in keys:
        lines.append(f"| {k} | " + " | ".join(f"{p['per_device_gb'][k]:.2f}" for p in plans) + " |")
    for k, label in (("persistent_gb", "**persistent** (params + Adam + teacher)"),
                     ("rollout_peak_gb", "**rollout peak**"),
                     ("train_peak_gb_flash_attention", "**train peak, flash attention**"),
                     ("train_peak_gb_naive_attention", "**train peak, current attention**")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(f"{p[k]:.1f}" for p in plans) + " |")
    lines.append("| HBM per device | " + " | ".join(f"{p['hbm_gb_per_device']:.0f}" for p in plans) + " |")
    for k, label in (("rollout_rows_per_device_that_fit", "rollout rows/shard that fit (90% HBM)"),
                     ("train_rows_per_device_that_fit_flash", "train rows/shard that fit, flash"),
                     ("train_rows_per_device_that_fit_naive", "train rows/shard that fit, current")):  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(str(p[k]) for p in plans) + " |")
    lines.append("| decode: GB read per step (weights + mean KV) | " + " | ".join(
        f"{p['decode_roofline']['bytes_per_step_gb']:.2f}" for p in plans) + " |")
    lines.append("| decode roofline ms/step (HBM bound) | " + " | ".join(
        f"{p['decode_roofline']['ms_per_step']:.2f}" for p in plans) + " |")
    lines.append("| decode roofline tokens/s, all devices | " + " | ".join(
        f"{p['decode_roofline']['tokens_per_s_total']:.0f}" for p in plans) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=64, help="rollout / train batch rows")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--response", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=256, help="TrainConfig.chunk_size")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = ap.parse_args(argv)
    plans = [plan(s, t, hw, args.rows, args.prompt, args.response, args.chunk)
             for s, t in PAIRS for hw in HARDWARE]  # fmt: skip
    print(f"rows {args.rows} x (prompt {args.prompt} + response {args.response}), chunk {args.chunk}\n")
    print(table(plans))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"command": "python scripts/memory_plan.py " + " ".join(argv or sys.argv[1:]),
               "assumptions": __doc__.split("Choices (stated in the JSON too):")[1].strip(),
               "plans": plans}  # fmt: skip
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
