"""Run a check on N fake CPU devices in a fresh subprocess (the device count is fixed at JAX
start-up, so the rest of the suite keeps seeing one device)."""

import os
import pathlib
import subprocess
import sys

TESTS_DIR = pathlib.Path(__file__).parent


def run_on_fake_devices(module: str, function: str, ok_marker: str, n_devices: int = 8) -> None:
    """Imports tests/<module>.py in a subprocess with n_devices CPU devices and calls function();
    asserts it exited cleanly and printed ok_marker."""
    env = dict(os.environ)
    flag = f"--xla_force_host_platform_device_count={n_devices}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(TESTS_DIR), str(TESTS_DIR.parent), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", f"import {module}; {module}.{function}()"],
        env=env, cwd=TESTS_DIR.parent, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert ok_marker in result.stdout, result.stdout[-2000:]
