"""trb_jax.locking: one trainer per workdir; a lock left by a killed trainer is taken over."""

import os
import signal
import socket
import subprocess
import sys

import pytest

from trb_jax import locking
from trb_jax.errors import WorkdirError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with locking.WorkdirLock(str(tmp_path)):
        holder = locking.holder(str(tmp_path))
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(WorkdirError) as e:
            locking.WorkdirLock(str(tmp_path)).acquire()
    assert str(e.value) == (
        f"{tmp_path} is in use by another trainer: pid {os.getpid()} on host "
        f"{socket.gethostname()} (started {holder['started']}); wait for it to finish or use "
        f"another --workdir (lock file {tmp_path}/.lock)")
    # released cleanly: the record is cleared and the next holder sees no stale lock
    assert locking.holder(str(tmp_path)) is None
    with locking.WorkdirLock(str(tmp_path)) as lock:
        assert lock.previous is None


def test_stale_lock_after_kill_9_is_taken_over(tmp_path, capfd):
    code = ("import sys, time; from trb_jax import locking; "
            "locking.WorkdirLock(sys.argv[1]).acquire(); print('locked', flush=True); "
            "time.sleep(600)")
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkdirError, match=rf"pid {proc.pid} on host "):
            locking.WorkdirLock(str(tmp_path)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with locking.WorkdirLock(str(tmp_path)) as lock:
        assert lock.previous["pid"] == proc.pid
    err = capfd.readouterr().err
    assert f"was locked by pid {proc.pid} on host {socket.gethostname()}" in err
    assert "ended without releasing it (killed?); lock taken over" in err


@pytest.mark.parametrize("text", ["12345", "[1, 2]", "not json"])
def test_a_foreign_lock_file_is_taken_over_not_a_crash(tmp_path, capfd, text):
    """Another tool's WORKDIR/.lock (e.g. a bare pid) is described, and the lock taken over."""
    (tmp_path / ".lock").write_text(text)
    assert locking.holder(str(tmp_path)) == {"text": text}
    with locking.WorkdirLock(str(tmp_path)) as lock:
        assert lock.previous == {"text": text}
    assert f"was locked by an unknown holder (lock file text {text!r})" in capfd.readouterr().err
