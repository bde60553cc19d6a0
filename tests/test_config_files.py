"""Config files are found from any directory: in the checkout and after a non-editable install."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from trb_jax import config as C
from trb_jax import config_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_configs_path_resolves_to_the_checkout_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    want = os.path.join(ROOT, "configs", "toy.py")
    assert config_files.resolve("configs/toy.py") == want
    assert config_files.resolve_argv(["prog", "--config=configs/toy.py:method=trb,seed=3", "-x"]) \
        == ["prog", f"--config={want}:method=trb,seed=3", "-x"]
    assert config_files.resolve_argv(["prog", "--config", "configs/toy.py"]) \
        == ["prog", "--config", want]
    assert C.repo_config_path("toy") == want


def test_a_file_under_the_working_directory_wins_and_unknown_paths_are_kept(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "toy.py").write_text("def get_config(arg=None): ...\n")
    assert config_files.resolve("configs/toy.py") == "configs/toy.py"
    for path in ("configs/nope.py", "elsewhere/toy.py", "toy.py", "/abs/configs/toy.py"):
        assert config_files.resolve(path) == path


def _build_wheel(tmp_path) -> tuple[str, str]:
    """`pip wheel --no-deps` of a copy of this checkout (no stale build/, no network)."""
    src, out_dir = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "runs", "workdirs", "*.egg-info", "__pycache__",
        ".hypothesis", ".pytest_cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "--no-cache-dir", "-w", str(out_dir), str(src)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = [f for f in os.listdir(out_dir) if f.endswith(".whl")]
    return os.path.join(out_dir, wheel), proc.stdout + proc.stderr


@pytest.mark.slow
def test_non_editable_install_finds_the_configs_from_any_directory(tmp_path):
    wheel, log = _build_wheel(tmp_path)
    # No packaging warnings (license as an SPDX string, every package declared).
    warnings = [ln for ln in log.splitlines()
                if "Warning" in ln and "byte-compil" not in ln and "Location 'file:" not in ln]
    assert not warnings, "\n".join(warnings)

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        metadata = zf.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "License-Expression: Apache-2.0" in metadata
    for sub, prefix in (("trb_jax", "trb_jax"), ("configs", "trb_jax/configs")):
        for dirpath, _, files in os.walk(os.path.join(ROOT, sub)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), os.path.join(ROOT, sub))
                    assert f"{prefix}/{rel}" in names, f"{sub}/{rel} is not in the wheel"

    # A pure-Python wheel unpacked into a directory is an install (what `pip install --target`
    # does); run from a directory that has no configs/ and without the checkout on the path.
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    work = tmp_path / "work"
    work.mkdir()
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
            if p and os.path.abspath(p) != ROOT]  # other entries (e.g. extra packages) stay
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *keep]),
           "JAX_PLATFORMS": "cpu"}
    probe = (
        "import os, sys, trb_jax\n"
        "from trb_jax import config, config_files\n"
        f"site = {str(site)!r}\n"
        "assert trb_jax.__file__.startswith(site), trb_jax.__file__\n"
        "p = config_files.resolve('configs/toy.py')\n"
        "assert p.startswith(site) and config.repo_config_path('toy') == p, p\n"
        "cfg = config.to_run_config(config.load_config_file(p, 'method=trb'), workdir='w')\n"
        "assert cfg.model.student.startswith(site) and os.path.isdir(cfg.model.student)\n"
        "assert os.path.isfile(cfg.data.source)\n"
        "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]

    # The CLI: `--config=configs/smoke.py` loads the installed file (a bad override then fails
    # on its field, which proves the file was read; a missing file would fail earlier).
    proc = subprocess.run(
        [sys.executable, "-m", "trb_jax.train", "--config=configs/smoke.py",
         f"--workdir={tmp_path / 'run'}", "--config.method.eps0=-1"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "method.eps0" in out, out[-3000:]
