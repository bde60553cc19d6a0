"""Run configs: every configs/*.py converts, and each bad setting is a one-line error naming it."""

import importlib.util
import os
import subprocess
import sys

import pytest

from trb_jax import config as C
from trb_jax import methods

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", sorted(methods.METHODS))
@pytest.mark.parametrize("pair", ["qwen3_0p6b_4b", "qwen3_1p7b_8b"])
def test_paper_configs_convert_for_every_method(pair, method):
    cd = _load("opd").get_config(f"pair={pair},method={method}")
    cfg = C.to_run_config(cd, workdir="/w")
    assert cfg.method.name == method
    assert cfg.rollout.top_k == 16
    assert cfg.data.max_examples == 25_600
    assert cfg.data.system_prompt.startswith("Please reason step by step")
    assert cfg.model.student.endswith("-Base")
    assert (cfg.model.param_dtype, cfg.model.compute_dtype, cfg.model.teacher_dtype) == (
        "float32", "bfloat16", "bfloat16")  # float32 master weights + AdamW state
    assert cfg.train.microbatch_rows == 8
    names = {d.name for d in cfg.eval.datasets}
    assert names == set(_load("opd").SUITES[pair])


def test_smoke_config_substitutes_the_workdir():
    cfg = C.to_run_config(_load("smoke").get_config(), workdir="/runs/x")
    assert cfg.model.student == "/runs/x/smoke/student"
    assert cfg.data.source == "/runs/x/smoke/train.jsonl"
    assert cfg.eval.datasets[0].source == "/runs/x/smoke/test.jsonl"
    assert cfg.train.num_steps >= 20


def test_config_args_are_checked():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['paier'\]"):
        _load("opd").get_config("paier=x")
    with pytest.raises(ValueError, match="unknown pair 'qwen3_32b'"):
        _load("opd").get_config("pair=qwen3_32b")


def _base():
    cd = C.base_config()
    cd.model.student, cd.model.teacher, cd.data.source = "s", "t", "d.jsonl"
    return cd


def _error(mutate) -> str:
    cd = _base()
    mutate(cd)
    with pytest.raises(C.ConfigError) as e:
        C.to_run_config(cd)
    message = str(e.value)
    assert "\n" not in message
    return message


def _set(path, value):
    def mutate(cd):
        *parents, leaf = path.split(".")
        node = cd
        for p in parents:
            node = node[p]
        with node.unlocked() if hasattr(node, "unlocked") else _nullcontext():
            node[leaf] = value
    return mutate


class _nullcontext:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("path, value, expected", [
    ("method.eps0", -0.01, "method.eps0: must be >= 0, got -0.01"),
    # inf became a NaN eps after the warmup (inf * 0) and the teacher kept decoding
    ("method.eps0", float("inf"), "method.eps0: must be a finite number, got inf"),
    ("optim.peak_lr", float("nan"), "optim.peak_lr: must be a finite number, got nan"),
    ("train.on_nonfinite", "ignore", "train.on_nonfinite: must be 'raise' or 'skip', got 'ignore'"),
    ("data.overlong", "wrap", "data.overlong: must be one of ('drop', 'truncate', 'error'), got "
                              "'wrap'"),
    ("method.warmup_steps", 0, "method.warmup_steps: must be > 0, got 0"),
    ("method.warmup_steps", -5, "method.warmup_steps: must be > 0, got -5"),
    ("method.name", "dagger", "method.name: unknown method 'dagger'"),
    ("rollout.top_k", 0, "rollout.top_k: must be >= 1, got 0"),
    ("rollout.temperature", 0.0, "rollout.temperature: must be > 0, got 0.0"),
    ("rollout.solver", "secant", "rollout.solver: must be one of"),
    ("train.num_steps", 0, "train.num_steps: must be >= 1, got 0"),
    ("train.chunk_size", 0, "train.chunk_size: must be >= 1, got 0"),
    ("model.param_dtype", "float16", "model.param_dtype: must be one of"),
    ("model.param_dtype", "bfloat16", "model.param_dtype: bfloat16 trained weights lose AdamW updates"),
    ("model.compute_dtype", "float16", "model.compute_dtype: must be '' or one of"),
    ("train.microbatch_rows", -1, "train.microbatch_rows: must be >= 0, got -1"),
    ("train.microbatch_rows", 3, "train.microbatch_rows: 3 must divide the 8 rows per step"),
    ("model.attention", "flash", "model.attention: must be one of"),
    ("model.teacher", "", "model.teacher: a teacher checkpoint path is required"),
    ("data.source", "", "data.source: a prompt file or hub dataset id is required"),
    ("data.shuffle_seed", -1, "data.shuffle_seed: must be >= 0, got -1"),
    ("optim.clip_norm", 0.0, "optim.clip_norm: must be > 0, got 0.0"),
    ("eval.num_samples", 0, "eval.num_samples: must be >= 1, got 0"),
    ("train.eval_every", 5, "train.eval_every: periodic evaluation needs eval.datasets"),
    ("mesh.data", 0, "mesh.data: must be -1 or >= 1, got 0"),
    ("objective.topk_support", "tail", "objective.topk_support: must be one of ('renormalized', "
                                       "'tail_bucket', 'unrenormalized'), got 'tail'"),
    ("objective.name", "kl", "objective.name: unknown objective 'kl'; choose one of"),
    ("objective.trust_threshold", 1.5, "objective.trust_threshold: must be in (0, 1], got 1.5"),
    ("method.sft_checkpoints", (15, 0), "method.sft_checkpoints: every entry must be >= 1"),
    ("method.sft_lr", -1.0, "method.sft_lr: must be >= 0, got -1.0"),
])
def test_bad_values_are_one_line_errors_naming_the_field(path, value, expected):
    assert _error(_set(path, value)).startswith(expected)


def test_bf16_adamw_only_when_asked_for():
    cd = _base()
    cd.model.param_dtype, cd.model.allow_bf16_adamw = "bfloat16", True
    assert C.to_run_config(cd).model.param_dtype == "bfloat16"


def test_unknown_fields_are_errors_naming_the_field():
    def add(section, key):
        def mutate(cd):
            with cd.unlocked():
                cd[section][key] = 1
        return mutate

    assert _error(add("method", "epsilon0")).startswith(
        "unknown config field 'method.epsilon0'; known fields of method: ['beta_start', 'eps0',")
    assert _error(add("rollout", "beam")).startswith("unknown config field 'rollout.beam'")

    def top(cd):
        with cd.unlocked():
            cd.lr = 1.0
    assert _error(top) == ("unknown config field 'lr'; known sections: ['data', 'eval', "
                           "'mesh', 'method', 'model', 'objective', 'optim', 'prepare', 'rollout', 'train']")

    def eval_ds(cd):
        cd.eval.datasets.m = dict(source="x.jsonl", promt_field="q")
    assert _error(eval_ds).startswith("unknown config field 'eval.datasets.m.promt_field'")


def test_workdir_placeholder_needs_a_workdir():
    cd = _base()
    cd.model.student = "{workdir}/s"
    with pytest.raises(C.ConfigError, match=r"uses \{workdir\} but no workdir"):
        C.to_run_config(cd)


def _cli(*args):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "trb_jax.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_rejects_unknown_override_and_reports_bad_values(tmp_path):
    out = _cli("--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.method.epsilon0=1")
    assert out.returncode != 0
    assert "epsilon0" in out.stderr
    out = _cli("--config=configs/smoke.py", f"--workdir={tmp_path}", "--config.method.eps0=-1")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == "config error: method.eps0: must be >= 0, got -1.0"
    out = _cli("--config=configs/smoke.py:method=dagger", f"--workdir={tmp_path}")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1].startswith(
        "config error: method.name: unknown method 'dagger'")


@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_toy_config_points_at_the_shipped_world(method):
    cfg = C.to_run_config(_load("toy").get_config(f"method={method},seed=3"), workdir="/w")
    assert os.path.isfile(os.path.join(cfg.model.student, "model.safetensors"))
    assert os.path.isfile(cfg.data.source) and os.path.isfile(cfg.eval.datasets[0].source)
    assert cfg.data.system_prompt == ""  # the toy models were trained without one
    assert (cfg.train.seed, cfg.data.shuffle_seed, cfg.method.name) == (3, 3, method)


def test_load_config_file_matches_the_module(tmp_path):
    cd = C.load_config_file(C.repo_config_path("smoke"), "method=veto")
    assert cd.method.name == "veto"
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config_file(str(tmp_path / "nope.py"))


@pytest.mark.parametrize("name", ["opd", "toy"])
def test_config_files_take_the_objective_as_an_argument(name):
    cd = C.load_config_file(C.repo_config_path(name), "method=trb,objective=tropd")
    assert (cd.method.name, cd.objective.name) == ("trb", "tropd")
    assert C.load_config_file(C.repo_config_path(name), "method=trb").objective.name == "opd"
    with pytest.raises(ValueError, match="known: .*objective"):
        C.load_config_file(C.repo_config_path(name), "objectve=tropd")
