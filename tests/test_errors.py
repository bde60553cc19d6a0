"""trb_jax.errors: one stderr line and exit status 1 for every expected failure of the CLIs."""

import os
import subprocess
import sys

import pytest

from trb_jax import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _exit_message(capsys, fn, *args):
    with pytest.raises(SystemExit) as e:
        errors.cli_main(fn)(*args)
    err = capsys.readouterr().err
    assert e.value.code == errors.EXIT_CODE == 1
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("error,prefix", [
    (errors.ConfigError("train.num_steps: must be >= 1, got 0"), "config error: train.num_steps"),
    (errors.DataError("d.jsonl:3 (record 2): field 'answer' is null"), "data error: d.jsonl:3"),
    (errors.CheckpointError("model.student: checkpoint directory /x does not exist"),
     "checkpoint error: model.student"),
    (errors.WorkdirError("/w is in use by another trainer"), "workdir error: /w"),
    (errors.NonFiniteError("update 3: loss nan"), "non-finite: update 3"),
])
def test_cli_main_prints_one_line_per_user_error(capsys, error, prefix):
    def main():
        raise error
    assert _exit_message(capsys, main).startswith(prefix)


def test_cli_main_reports_file_system_errors_with_the_path(capsys, tmp_path):
    def main():
        open(tmp_path / "missing" / "x.json")
    msg = _exit_message(capsys, main)
    assert msg.startswith("file system error: [Errno 2] No such file or directory")
    assert str(tmp_path / "missing" / "x.json") in msg


def test_cli_main_keeps_tracebacks_for_bugs():
    def main():
        raise KeyError("a bug")
    with pytest.raises(KeyError):
        errors.cli_main(main)()


def test_multiline_messages_are_folded(capsys):
    def main():
        raise errors.ConfigError("first\nsecond   third")
    assert _exit_message(capsys, main) == "config error: first second third"


def test_check_writable(tmp_path):
    errors.check_writable(str(tmp_path / "new"))  # created
    assert os.listdir(tmp_path / "new") == []  # the probe is gone
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(errors.WorkdirError, match=r"^%s is not writable \(Not a directory\); "
                       r"results could not be saved there$" % str(blocker / "run")):
        errors.check_writable(str(blocker / "run"))


def test_check_writable_permission_denied(tmp_path, monkeypatch):
    """As a user without write permission would see it (root ignores chmod, so simulated)."""
    real_open = open

    def deny(path, *args, **kwargs):
        if ".write_test" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(errors.WorkdirError, match=r"is not writable \(Permission denied\)"):
        errors.check_writable(str(tmp_path))


def test_atomic_write_leaves_no_partial_file(tmp_path):
    path = str(tmp_path / "out.json")
    errors.atomic_write(path, "{}")
    assert open(path).read() == "{}" and os.listdir(tmp_path) == ["out.json"]


def _run_cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def test_config_typo_is_one_line(tmp_path):
    out = _run_cli("trb_jax.train", "--config=configs/smoke.py", f"--workdir={tmp_path}/w",
                   "--config.train.num_stepz=3")
    assert out.returncode == 1
    assert out.stderr == ("config error: --config.train.num_stepz: unknown config field "
                          "'train.num_stepz'; did you mean 'train.num_steps'?\n")
    assert not os.path.exists(tmp_path / "w")  # nothing written


def test_evaluate_checks_the_workdir_before_loading_anything(tmp_path):
    """A workdir that cannot be written fails at once (not after the whole evaluation)."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = _run_cli("trb_jax.evaluate", "--config=configs/smoke.py", f"--workdir={blocker}/run",
                   f"--student={tmp_path}/never_loaded")
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr == (f"workdir error: {blocker}/run is not writable (Not a directory); the "
                          "evaluation results (eval_<tag>.json) could not be saved there\n")
