"""Compiled per-device memory of the real programs at the paper's sizes, on 8 fake CPU devices.

    JAX_PLATFORMS=cpu python benchmarks/compile_memory.py     # both pairs, H100 + v5e-8, blockwise
    python benchmarks/compile_memory.py --attention xla        # the reference einsum attention
    python benchmarks/compile_memory.py --pair qwen3_0p6b_4b --hardware h100 --program train_teacher \
        --microbatch-rows 64                                   # one pass over all rows
    python benchmarks/compile_memory.py --table --attention blockwise   # markdown from the JSON

For each paper pair of configs/opd.py (model sizes, dtype policy, remat, chunk size, top-k,
micro-batch, mesh) this builds the programs a run executes, from `jax.ShapeDtypeStruct` inputs
carrying their shardings (no weight is allocated), compiles them for 8 devices and records
XLA's `memory_analysis()` per device:

  train_stored    `train_step` in the stored mode (the rollout's top-k teacher log-probs)
  train_teacher   `train_step` in the teacher mode (one teacher forward per micro-batch)
  train_*_tropd   the same two with the TrOPD objective (supports: the teacher's top-k and the
                  sampled token; stored mode reads the rollout's teacher top-k and sampled scores)
  prefill         `rollout._start`: student + teacher prefill into KV caches of prompt + response
  decode          `rollout._decode`: the lockstep TRB decode loop (its body is one decode step
                  of both models, the blend solve and the sampler; the state is donated)

XLA:CPU is a proxy for a GPU / TPU compiler: buffer assignment, fusion and rematerialisation
differ per backend, so these figures are the CPU compiler's, not measurements on an H100 or a
v5e. One known CPU artefact is handled explicitly: XLA:CPU upcasts bfloat16 matmul operands
to float32, so a bf16 program's temporaries hold float32 copies of bf16 weights (and of bf16
activations) that a GPU/TPU program does not. Each program is therefore compiled twice:

  bf16      the real dtype policy (float32 master student + AdamW, bfloat16 compute, bfloat16
            teacher): exact arguments / outputs; temporaries inflated by the CPU upcast copies.
  f32       the same program with every dtype float32: no upcast copies, but activations and
            weights twice their bf16 size, so its temporaries bound a bf16 program's from above.

The estimate per device is arguments + outputs - aliased (donated) bytes of the bf16 program plus
min(temporaries bf16, temporaries f32): both are upper bounds of the bf16 program's
temporaries on a backend without the upcast. The rollout programs (prefill, decode) also add
the TrainState (float32 student + AdamW) that the trainer keeps alive while they run. The raw
figures are all in the JSON.
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from trb_jax import config as config_lib  # noqa: E402
from trb_jax import objectives  # noqa: E402
from trb_jax import rollout as rollout_lib  # noqa: E402
from trb_jax import sharding  # noqa: E402
from trb_jax import train_step as ts  # noqa: E402
from trb_jax.behaviors import make_knobs  # noqa: E402
from trb_jax.blending import EosMap  # noqa: E402
from trb_jax.models import attention as attention_lib  # noqa: E402
from trb_jax.models import qwen3  # noqa: E402

GB = 1e9
RESULTS = ROOT / "benchmarks" / "results" / "compile_memory.json"
PRESET_OF = {"Qwen/Qwen3-0.6B-Base": "qwen3_0p6b", "Qwen/Qwen3-1.7B-Base": "qwen3_1p7b",
             "Qwen/Qwen3-4B": "qwen3_4b", "Qwen/Qwen3-8B": "qwen3_8b"}
# Qwen3's ids: <|endoftext|> (Base EOS), <|im_end|> (chat EOS).
ENDOFTEXT, IM_END = 151643, 151645


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    hbm_gb: float
    budget_gb: float  # what we allow a program per device (headroom for the runtime)
    mesh: tuple[int, int, int] | None  # None: the config's mesh

HARDWARE = {
    "h100": Hardware("8x H100 80GB", 80.0, 72.0, None),
    # 16 GB cannot hold an 8B teacher replicated: tensor=4 splits heads / MLP / vocab.
    "v5e8": Hardware("TPU v5e-8 (16 GB HBM per chip)", 16.0, 14.4, (1, 2, 4)),
}
PROGRAMS = ("train_stored", "train_teacher", "prefill", "decode", "train_stored_tropd",
            "train_teacher_tropd")


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _with_attention(config: qwen3.Qwen3Config, attention: str) -> qwen3.Qwen3Config:
    return dataclasses.replace(config, attention=attention)


def _mem(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"arguments": m.argument_size_in_bytes, "outputs": m.output_size_in_bytes,
            "aliased": m.alias_size_in_bytes, "temporaries": m.temp_size_in_bytes}


def build(run_cfg, hw: Hardware, args, policy: str) -> dict:
    """Lowered programs {name: (jitted, args, kwargs)} for one pair / hardware / dtype policy."""
    model = run_cfg.model
    if policy == "f32":
        param, compute, teacher_dtype = "float32", "float32", "float32"
    else:
        param, compute, teacher_dtype = model.param_dtype, model.student_compute_dtype, model.teacher_param_dtype
    student = _with_attention(qwen3.PRESETS[PRESET_OF[model.student]].with_dtype(param, compute), args.attention)
    teacher = _with_attention(qwen3.PRESETS[PRESET_OF[model.teacher]].with_dtype(teacher_dtype, compute), args.attention)
    data, fsdp, tensor = hw.mesh or (run_cfg.mesh.data, run_cfg.mesh.fsdp, run_cfg.mesh.tensor)
    mesh = sharding.make_mesh(data, fsdp, tensor)
    mb = args.microbatch_rows if args.microbatch_rows is not None else run_cfg.train.microbatch_rows
    if hw.mesh is not None and args.microbatch_rows is None:
        mb = mesh.shape["data"] * mesh.shape["fsdp"]  # one row per batch shard
    eos = EosMap.from_ids([ENDOFTEXT], [IM_END, ENDOFTEXT])
    tcfg = ts.TrainConfig(student=student, teacher=teacher, optim=run_cfg.optim,
                          top_k=run_cfg.rollout.top_k, chunk_size=run_cfg.train.chunk_size,
                          eos=eos, remat_layers=model.remat_layers, microbatch_rows=mb)
    R, P, T, K = args.rows, args.prompt, args.response, run_cfg.rollout.top_k
    key = jax.random.key(0)

    state = jax.eval_shape(lambda: ts.init_train_state(qwen3.init_params(student, key), tcfg, key))
    state = _abstract(state, ts.state_shardings(tcfg, mesh, state))
    params_t = jax.eval_shape(lambda: qwen3.init_params(teacher, key))
    params_t = _abstract(params_t, ts.teacher_shardings(tcfg, mesh, params_t))
    i32, f32 = jnp.int32, jnp.float32
    sd = jax.ShapeDtypeStruct
    common = dict(input_ids_bs=sd((R, P + T), i32), attention_mask_bs=sd((R, P + T), i32),
                  response_mask_bt=sd((R, T), jnp.bool_))
    stored = ts.Batch(**common, topk_ids_btk=sd((R, T, K), i32), topk_teacher_logprob_btk=sd((R, T, K), f32))
    scored = ts.Batch(**common, teacher_input_ids_bs=sd((R, P + T), i32),
                      teacher_attention_mask_bs=sd((R, P + T), i32))
    stored_tropd = ts.Batch(**common, teacher_topk_ids_btk=sd((R, T, K), i32),
                            teacher_topk_logprob_btk=sd((R, T, K), f32),
                            sampled_teacher_logprob_bt=sd((R, T), f32))
    tcfg_tropd = dataclasses.replace(tcfg, objective=objectives.ObjectiveConfig(name="tropd"))
    progs = {}
    for name, batch, tp, cfg in (("train_stored", stored, None, tcfg), ("train_teacher", scored, params_t, tcfg),
                                 ("train_stored_tropd", stored_tropd, None, tcfg_tropd),
                                 ("train_teacher_tropd", scored, params_t, tcfg_tropd)):
        bsh = ts.batch_shardings(mesh, batch)
        step = ts.jit_train_step(cfg, mesh=mesh, state_sharding=jax.tree.map(lambda x: x.sharding, state),
                                 batch_sharding=bsh,
                                 teacher_sharding=None if tp is None else jax.tree.map(lambda x: x.sharding, tp))
        progs[name] = (step.jitted, (state, _abstract(batch, bsh), tp), {})

    # Rollout: a compute-dtype copy of the student placed like the teacher (trainer.inference_student).
    s_inf = student.with_dtype(compute, compute)
    params_s = jax.eval_shape(lambda: qwen3.init_params(s_inf, key))
    params_s = _abstract(params_s, qwen3.param_shardings(s_inf, mesh, rules=sharding.INFERENCE_AXIS_RULES))
    prompts = rollout_lib.Prompts(sd((R, P), i32), sd((R, P), i32), sd((R, P), i32), sd((R, P), i32))
    prompts = _abstract(prompts, sharding.batch_tree_shardings(mesh, prompts))
    rng_b = jax.eval_shape(lambda: rollout_lib.row_keys(key, jnp.arange(R)))
    rng_b = _abstract(rng_b, sharding.batch_tree_shardings(mesh, rng_b))
    knobs = make_knobs(eps=0.01)
    spec = rollout_lib.RolloutSpec(behavior="trb", max_new_tokens=T, eos=eos, student_eos_id=ENDOFTEXT,
                                   teacher_eos_id=IM_END, top_k=K, solver=run_cfg.rollout.solver)
    kw = dict(student_config=s_inf, teacher_config=teacher, spec=spec)
    with jax.set_mesh(mesh):
        dstate = jax.eval_shape(functools.partial(rollout_lib._start, **kw), params_s, params_t, prompts, rng_b, knobs)
    dstate = _abstract(dstate, rollout_lib.decode_state_shardings(mesh, dstate))
    progs["prefill"] = (rollout_lib._start, (params_s, params_t, prompts, rng_b, knobs), kw)
    progs["decode"] = (rollout_lib._decode, (params_s, params_t, dstate, knobs), kw)
    info = {"mesh": dict(mesh.shape), "microbatch_rows": mb, "rows_per_microbatch_shard": mb // (data * fsdp),
            "student": dataclasses.asdict(student), "teacher": dataclasses.asdict(teacher)}
    return mesh, progs, info


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", action="append", choices=["qwen3_0p6b_4b", "qwen3_1p7b_8b"])
    ap.add_argument("--hardware", action="append", choices=sorted(HARDWARE))
    ap.add_argument("--program", action="append", choices=PROGRAMS)
    ap.add_argument("--policy", action="append", choices=["bf16", "f32"])
    ap.add_argument("--rows", type=int, default=64, help="rows per update / rollout")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--response", type=int, default=8192)
    ap.add_argument("--microbatch-rows", type=int, default=None,
                    help="train micro-batch rows (default: configs/opd.py's on its own mesh, "
                         "one row per batch shard on the v5e-8 mesh)")
    ap.add_argument("--attention", default="blockwise", choices=attention_lib.IMPLEMENTATIONS,
                    help="model.attention of both models. Default blockwise: the pure-JAX flash "
                         "attention, the CPU stand-in for cudnn (H100) / splash (TPU), which "
                         "'auto' picks there; xla: the reference einsum ([S, S] scores)")
    ap.add_argument("--out", type=pathlib.Path, default=RESULTS)
    ap.add_argument("--table", action="store_true",
                    help="print the markdown table of --out for --attention and exit")
    ap.add_argument("--refresh", action="store_true", help="recompute the estimates in --out and exit")
    args = ap.parse_args(argv)
    if args.table or args.refresh:
        payload = json.loads(args.out.read_text())
        payload["results"] = [{**r, **_estimate(r)} for r in payload["results"]]
        if args.refresh:
            args.out.write_text(json.dumps(payload, indent=1) + "\n")
        if args.table:
            print(table([r for r in payload["results"] if r["attention"] == args.attention]))
        return
    pairs = args.pair or ["qwen3_0p6b_4b", "qwen3_1p7b_8b"]
    hws = args.hardware or ["h100", "v5e8"]
    programs = args.program or list(PROGRAMS)
    policies = args.policy or ["bf16", "f32"]
    assert jax.device_count() == 8, jax.devices()
    results = json.loads(args.out.read_text())["results"] if args.out.exists() else []

    for pair in pairs:
        cd = config_lib.load_config_file(str(ROOT / "configs" / "opd.py"), f"pair={pair}")
        run_cfg = config_lib.to_run_config(cd, workdir="/tmp")
        for hw_name in hws:
            hw = HARDWARE[hw_name]
            for program in programs:
                entry = {"pair": pair, "hardware": hw.name, "hardware_key": hw_name, "program": program,
                         "rows": args.rows, "prompt": args.prompt, "response": args.response,
                         "attention": args.attention, "hbm_gb": hw.hbm_gb, "budget_gb": hw.budget_gb}
                for policy in policies:
                    mesh, progs, info = build(run_cfg, hw, args, policy)
                    fn, fargs, kw = progs[program]
                    t0 = time.perf_counter()
                    with jax.set_mesh(mesh):
                        compiled = fn.lower(*fargs, **kw).compile()
                    entry[policy] = {**_mem(compiled), "compile_s": round(time.perf_counter() - t0, 1)}
                    entry.update({k: v for k, v in info.items() if k not in ("student", "teacher")})
                    print(f"{pair} {hw_name} {program} {policy}: " + ", ".join(
                        f"{k} {v / GB:.2f} GB" if k != "compile_s" else f"{v} s"
                        for k, v in entry[policy].items()), flush=True)
                entry.update(_estimate(entry))
                results = [r for r in results if _key(r) != _key(entry)] + [entry]
                results = [{**r, **_estimate(r)} for r in results]
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps({"command": "python benchmarks/compile_memory.py "
                                                + " ".join(argv or sys.argv[1:]),
                                                "method": __doc__.split("XLA:CPU is a proxy")[1].strip(),
                                                "jax": jax.__version__, "results": results}, indent=1) + "\n")
    print(f"wrote {args.out}")


def _plan_gb(pair: str, hw_key: str, program: str) -> float | None:
    """The on-paper figure of scripts/memory_plan.py for the same pair / hardware (its own
    assumptions: 8 rows per device, no micro-batching, flash attention for the train peak)."""
    path = RESULTS.parent / "memory_plan.json"
    if not path.exists():
        return None
    hw_name = {"h100": "8x H100 80GB (SXM)", "v5e8": "TPU v5e-8 (16 GB HBM per chip)"}[hw_key]
    s, t = pair.split("_")[1], pair.split("_")[2]
    for p in json.loads(path.read_text())["plans"]:
        if p["hardware"] == hw_name and p["pair"] == f"qwen3_{s} <- qwen3_{t}":
            return p["rollout_peak_gb"] if program in ("prefill", "decode") else p["train_peak_gb_flash_attention"]
    return None


def table(results: list[dict]) -> str:
    """Markdown: one row per (pair, hardware, program, attention)."""
    head = ("| pair | hardware, mesh (data, fsdp, tensor) | program | attention | rows x tokens, micro-batch "
            "| arguments | outputs - aliased | temps bf16 (CPU upcast) | temps f32 | + TrainState held | **estimate** | budget "
            "| on-paper plan |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(results, key=lambda r: (r["pair"], r["hardware_key"], r["attention"], -r["rows"] * (r["prompt"] + r["response"]) if r["program"] in ("prefill", "decode") else 0, PROGRAMS.index(r["program"]))):
        b, f = r.get("bf16", {}), r.get("f32", {})
        mesh = r["mesh"]
        mb = f"{r['rows']} x {r['prompt'] + r['response']}" + (
            f", {r['microbatch_rows']}" if r["program"].startswith("train") else "")
        plan = (_plan_gb(r["pair"], r["hardware_key"], r["program"])
                if (r["rows"], r["prompt"] + r["response"]) == (64, 9216) else None)
        g = lambda x: f"{x / GB:.1f}" if x is not None else "-"  # noqa: E731
        lines.append(
            f"| {r['pair']} | {r['hardware'].split(' (')[0]}, {mesh['data']}, {mesh['fsdp']}, {mesh['tensor']} "
            f"| {r['program']} | {r['attention']} | {mb} | {g(b.get('arguments'))} "
            f"| {g(b['outputs'] - b['aliased']) if b else '-'} | {g(b.get('temporaries'))} | {g(f.get('temporaries'))} "
            f"| {r.get('held_train_state_gb') or '-'} "
            f"| **{r.get('estimate_gb', '-')}** {'fits' if r.get('fits') else 'OVER'} | {r['budget_gb']} "
            f"| {plan if plan is not None else '-'} |")
    return "\n".join(lines)


def _key(r: dict) -> tuple:
    mb = r.get("microbatch_rows") if r["program"].startswith("train") else None
    return (r["pair"], r["hardware_key"], r["program"], r["attention"], r["rows"], r["prompt"],
            r["response"], mb)


@functools.lru_cache(maxsize=None)
def _train_state_bytes(pair: str, hw_key: str) -> int:
    """Per-device bytes of the TrainState (float32 student + AdamW), which the trainer keeps
    alive while the rollout runs (the rollout programs' arguments hold only the bf16 copy)."""
    cd = config_lib.load_config_file(str(ROOT / "configs" / "opd.py"), f"pair={pair}")
    args = argparse.Namespace(microbatch_rows=None, attention="xla", rows=8, prompt=8, response=8)
    _, progs, _ = build(config_lib.to_run_config(cd, workdir="/tmp"), HARDWARE[hw_key], args, "bf16")
    state = progs["train_stored"][1][0]
    total = 0
    for x in jax.tree.leaves(state):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            continue
        n = 1
        for d in x.sharding.shard_shape(x.shape):
            n *= d
        total += n * x.dtype.itemsize
    return total


def _estimate(entry: dict) -> dict:
    """Per-device estimate (see the module docstring); rollout programs add the TrainState the
    trainer holds meanwhile."""
    b = entry.get("bf16")
    if b is None:
        return {}
    temps = [b["temporaries"]] + ([entry["f32"]["temporaries"]] if "f32" in entry else [])
    held = _train_state_bytes(entry["pair"], entry["hardware_key"]) if entry["program"] in ("prefill", "decode") else 0
    est = b["arguments"] + b["outputs"] - b["aliased"] + min(temps) + held
    raw = b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + held
    return {"held_train_state_gb": round(held / GB, 2), "estimate_gb": round(est / GB, 2),
            "raw_bf16_peak_gb": round(raw / GB, 2), "fits": est / GB <= entry["budget_gb"]}


if __name__ == "__main__":
    main()
