"""Two JAX processes on localhost (CPU, gloo collectives) train like one process.

Each worker is a subprocess with 4 fake CPU devices: `trb_jax.distributed.initialize` reads the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment, the mesh
(data 2, fsdp 2, tensor 2) spans both processes' 8 devices, each process loads only its rows
(`process_row_slice` + `global_batch_from_local`), runs 3 teacher-mode train steps, and both
write one Orbax checkpoint together. The test process computes the same 3 steps on one device
and compares the metrics (lr 1e-5: Adam's first update lr * g / (|g| + 1e-8) turns
reduction-order noise on near-zero gradients into parameter differences up to 2 lr, see
docs/train_step.md; with lr 1e-3 a per-row log-prob differed by 8e-5 after two steps); it then restores the 2-process checkpoint onto one device.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from test_sharding import SMALL_S, SMALL_T, small_batch_arrays, small_params, small_train_config
from trb_jax import checkpointing as ck
from trb_jax import train_step as ts

TESTS_DIR = pathlib.Path(__file__).parent
NUM_STEPS = 3
TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _fresh_state(cfg):
    return ts.init_train_state(jax.tree.map(jnp.copy, small_params(SMALL_S, 1)), cfg, jax.random.key(0))


def _worker() -> None:
    """One of the two processes (environment set by the test)."""
    from trb_jax import distributed, sharding
    from trb_jax.models import qwen3

    # Cross-process collectives on CPU (the default in this jax; said explicitly, before start-up).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    assert distributed.initialize(initialization_timeout=120)
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    out_dir = pathlib.Path(os.environ["TRB_TEST_OUT"])
    cfg = small_train_config(lr=1e-5)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    state_sh = ts.state_shardings(cfg, mesh, jax.eval_shape(lambda: _fresh_state(cfg)))
    state = sharding.init_sharded(lambda: _fresh_state(cfg), out_shardings=state_sh)
    teacher_sh = qwen3.param_shardings(SMALL_T, mesh, rules=sharding.INFERENCE_AXIS_RULES)
    params_t = sharding.init_sharded(lambda: small_params(SMALL_T, 2), out_shardings=teacher_sh)

    losses = []
    step_fn = None
    for i in range(NUM_STEPS):
        global_np, _ = small_batch_arrays(seed=10 + i)  # every process could build it; each keeps its rows
        rows = distributed.process_row_slice(global_np["input_ids_bs"].shape[0])
        local = ts.Batch(**{k: v[rows] for k, v in global_np.items()})
        batch_sh = ts.batch_shardings(mesh, jax.eval_shape(lambda: ts.Batch(**global_np)))
        batch = distributed.global_batch_from_local(local, batch_sh)
        assert batch.input_ids_bs.shape == global_np["input_ids_bs"].shape
        np.testing.assert_array_equal(distributed.local_rows(batch.input_ids_bs), global_np["input_ids_bs"][rows])
        if step_fn is None:
            step_fn = ts.jit_train_step(cfg, mesh=mesh, state_sharding=state_sh, batch_sharding=batch_sh,
                                        teacher_sharding=teacher_sh)  # fmt: skip
        state, metrics = step_fn(state, batch, params_t)
        distributed.log_metrics(lambda m: losses.append(m), metrics)

    manager = ck.make_manager(out_dir / "ckpt")
    ck.save(manager, NUM_STEPS, state, {"processes": jax.process_count()})
    manager.close()
    if distributed.is_primary():
        (out_dir / "losses.json").write_text(json.dumps(losses))
    else:
        assert losses == []  # metrics are written by process 0 only
    distributed.sync("done")
    print(f"MULTIPROCESS_WORKER_OK {jax.process_index()}", flush=True)
    distributed.shutdown()


def _run_workers(out_dir: pathlib.Path) -> list[str]:
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(
            JAX_PLATFORMS="cpu",
            XLA_FLAGS=(env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip(),
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            TRB_TEST_OUT=str(out_dir),
            PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent), env.get("PYTHONPATH", "")]),
        )
        for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
            env.pop(var, None)  # a CI runner inside SLURM must not trigger cluster detection
        procs.append(subprocess.Popen(
            [sys.executable, "-c", "import test_multiprocess as t; t._worker()"],
            env=env, cwd=TESTS_DIR.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    deadline = time.monotonic() + TIMEOUT_S
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:  # on a timeout or a crash of one worker, never leave the other behind
            if p.poll() is None:
                p.kill()
                p.communicate()
    for pid, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0 and f"MULTIPROCESS_WORKER_OK {pid}" in out, f"worker {pid}:\n{out[-4000:]}"
    return outputs


def test_two_processes_train_like_one(tmp_path):
    _run_workers(tmp_path)
    got = json.loads((tmp_path / "losses.json").read_text())

    # The same steps on one device, in this process.
    cfg = small_train_config(lr=1e-5)
    params_t = small_params(SMALL_T, 2)
    step = ts.jit_train_step(cfg)
    state = _fresh_state(cfg)
    want = []
    for i in range(NUM_STEPS):
        global_np, _ = small_batch_arrays(seed=10 + i)
        state, metrics = step(state, ts.Batch(**global_np), params_t)
        want.append({k: np.asarray(v).tolist() for k, v in metrics.items()})
    assert len(got) == NUM_STEPS
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for name in w:  # scalars and per-row [B] metrics
            np.testing.assert_allclose(g[name], w[name], rtol=1e-5, atol=1e-5, err_msg=name)
    assert got[0]["loss"] != got[-1]["loss"] and int(state.step) == NUM_STEPS

    # The checkpoint the two processes wrote together restores onto one device.
    manager = ck.make_manager(tmp_path / "ckpt")
    restored, extra = ck.restore(manager, None, ck.abstract_target(jax.eval_shape(lambda: state)))
    assert extra == {"processes": 2} and int(restored.step) == NUM_STEPS
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    for g, w in zip(jax.tree.leaves(restored.params), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)
    manager.close()
