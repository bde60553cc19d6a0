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


def test_unknown_world_is_refused_before_any_run(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        demo.main(["--world", "medium", "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --world: invalid choice: 'medium'" in err and "'hard'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("world", ["default", "hard"])
def test_each_world_reaches_its_own_config(monkeypatch, tmp_path, world):
    seen = []
    monkeypatch.setattr(demo.trainer, "train", lambda cfg, workdir: seen.append(cfg))
    demo.run_method("trb", str(tmp_path), 0, 1, world)
    (cfg,) = seen
    assert (("assets_hard" in cfg.model.student) == (world == "hard")), cfg.model.student
    assert cfg.rollout.max_new_tokens == (240 if world == "hard" else 48)
