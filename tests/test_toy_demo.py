"""trb_jax.toy.demo: argument errors are named before any run starts."""

import pytest

from trb_jax.toy import demo


@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_must_be_positive(capsys, tmp_path, steps):
    with pytest.raises(SystemExit) as e:
        demo.main(["--steps", steps, "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: --steps must be >= 1, got {steps}")
    assert not (tmp_path / "out").exists()
