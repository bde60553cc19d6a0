"""The compare_torch CLI (trb_jax.tools.compare_torch), run in-process on tiny checkpoints."""

import json

import numpy as np
import pytest
import tokenizers
import transformers

from tiny_qwen3 import TINY_VARIANTS, tiny_hf_model
from trb_jax.tools import compare_torch


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_compare")
    tiny_hf_model(seed=5, **TINY_VARIANTS["gqa2_tied_hd16"]).save_pretrained(path)
    return path


def _metrics(stdout):
    rows = [line.strip("|").split("|") for line in stdout.splitlines() if line.startswith("| ") and "metric" not in line]
    return {k.strip(): float(v) for k, v in rows}


def test_float32_passes_and_prints_metrics(tiny_dir, capsys):
    assert compare_torch.main(["--checkpoint", str(tiny_dir), "--num-random", "3", "--length", "12"]) == 0
    out = capsys.readouterr().out
    metrics = _metrics(out)
    assert "random ids (seed 0), 3 x 12" in out and "PASS" in out
    assert metrics["max_abs_diff"] <= 1e-4 * metrics["max_abs_logit"]
    assert metrics["max_kl"] <= 1e-5 and metrics["top1_agreement"] == 1.0


def test_tolerance_failure_exits_nonzero(tiny_dir, capsys):
    # bf16 differs from float32 ids-for-ids, but far less than the default bf16 tolerance...
    assert compare_torch.main(["--checkpoint", str(tiny_dir), "--dtype", "bfloat16", "--length", "12"]) == 0
    max_kl = _metrics(capsys.readouterr().out)["max_kl"]
    assert 0 < max_kl <= 1e-2
    # ... so a tolerance below the measured KL must fail.
    argv = ["--checkpoint", str(tiny_dir), "--dtype", "bfloat16", "--length", "12", "--tolerance", str(max_kl / 2)]
    assert compare_torch.main(argv) == 1
    assert "FAIL: max per-token KL" in capsys.readouterr().out


def test_uses_the_checkpoint_tokenizer(tiny_dir, tmp_path, capsys):
    # A word-level tokenizer over the tiny model's 128 ids, written next to its weights.
    words = [f"w{i}" for i in range(127)] + ["<pad>"]
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")
    for f in tiny_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    tokenizer.save_pretrained(tmp_path)
    argv = ["--checkpoint", str(tmp_path), "--prompts", "w1 w2 w3 w4 w5", "w9 w8"]
    assert compare_torch.main(argv) == 0
    out = capsys.readouterr().out
    assert "tokenizer, 2 prompts; real tokens: 7" in out
    ids, mask, _ = compare_torch.make_batch(tmp_path, compare_torch.parse_args(argv), 128)
    np.testing.assert_array_equal(ids, [[1, 2, 3, 4, 5], [127, 127, 127, 9, 8]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])


# ---------------------------------------------------------------------------------------------
# train-step and blend modes on tiny random pairs (float32 and bfloat16) and on the toy pair


def _tiny_pair(root, student_variant, teacher_variant, *, seeds=(11, 12)):
    """A student / teacher pair of tiny random checkpoints sharing the 128-token vocabulary, with
    different native EOS ids (student 1, teacher 2 and 3) so the EOS merge is exercised."""
    dirs = []
    for name, variant, seed, eos in (("student", student_variant, seeds[0], 1),
                                     ("teacher", teacher_variant, seeds[1], [2, 3])):
        model = tiny_hf_model(seed=seed, **TINY_VARIANTS[variant])
        model.generation_config.eos_token_id = eos
        model.save_pretrained(root / name)
        dirs.append(str(root / name))
    return dirs


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory):
    # untied GQA-2 student, tied MQA teacher of another head layout
    return _tiny_pair(tmp_path_factory.mktemp("tiny_pair"), "mha_untied", "mqa_tied_hd16")


def _run(argv, tmp_path, name):
    out = tmp_path / f"{name}.json"
    code = compare_torch.main([*argv, "--out", str(out)])
    return code, json.loads(out.read_text())


def _checks(report):
    return {c["check"]: c for c in report["checks"]}


def test_train_step_float32_tiny_pair(tiny_pair, tmp_path, capsys):
    student, teacher = tiny_pair
    code, report = _run(["--mode", "train-step", "--student", student, "--teacher", teacher,
                         "--response-length", "12", "--length", "6"], tmp_path, "ts32")
    out = capsys.readouterr().out
    assert code == 0, out
    assert "PASS: every check within its tolerance" in out and "| tensor | grad max abs |" in out
    assert report["eos"] == {"stop_id": 1, "eos_ids": [1, 2, 3]}
    s = report["summary"]
    # The acceptance numbers, float32.
    assert s["grad_rel_max"] <= 1e-4
    assert s["update_max_abs_far"] <= 1e-5 and s["update_far_elements"] > 0.5 * (
        s["update_far_elements"] + s["update_near_eps_elements"])
    assert s["support_agreement"] == 1.0 and s["per_token_loss_max_rel"] <= 1e-5
    assert abs(s["lr_jax"] - s["lr_torch"]) <= 1e-6 * s["lr_torch"]
    names = {r["tensor"] for r in report["tensors"]}
    assert "lm_head.weight" in names and "model.layers.1.mlp.down_proj.weight" in names


def test_train_step_bfloat16_tiny_pair(tiny_pair, tmp_path, capsys):
    student, teacher = tiny_pair
    argv = ["--mode", "train-step", "--student", student, "--teacher", teacher, "--dtype", "bfloat16",
            "--response-length", "12", "--length", "6"]
    code, report = _run(argv, tmp_path, "ts16")
    assert code == 0, capsys.readouterr().out
    s = report["summary"]
    # bf16 differences are real (so the float32 tolerances would fail) and within the bf16 ones.
    assert 1e-4 < s["grad_rel_fro_max"] <= compare_torch.TOLERANCES["bfloat16"]["grad_rel_fro"]
    assert s["student_logit_max_abs_diff"] > 1e-4
    # Against float32 PyTorch, JAX's bf16 gradient error is within 2x PyTorch's own bf16 error.
    assert s["grad_err_vs_f32_excess"] <= compare_torch.TOLERANCES["bfloat16"]["grad_vs_f32"]
    assert all(0 < r["grad_err_vs_f32_torch"] < 0.5 for r in report["tensors"])


def test_blend_tiny_pair_both_dtypes(tiny_pair, tmp_path, capsys):
    student, teacher = tiny_pair
    for dtype in ("float32", "bfloat16"):
        code, report = _run(["--mode", "blend", "--student", student, "--teacher", teacher, "--dtype", dtype,
                             "--eps", "0.05", "--response-length", "10", "--length", "6"], tmp_path, dtype)
        assert code == 0, capsys.readouterr().out
        s = report["summary"]
        assert s["interior_positions"] > 0.5 * s["positions"]
        for p in report["positions"]:
            assert abs(p["beta_jax"] - p["beta_torch"]) <= p["beta_allowed"]
            assert p["kl_jax"] <= 0.05 * (1 + 1e-5) + 1e-9
        if dtype == "float32":  # beta* within the solver's tolerance (1e-6) and its conditioning
            assert s["beta_max_abs_diff"] <= 1e-5 and s["kl_mu_max"] <= 1e-6


def test_wrong_learning_rate_fails(tiny_pair, tmp_path, monkeypatch, capsys):
    """A PyTorch step at twice the schedule's lr is caught (exit 1), by the lr and update checks."""
    from trb_jax.tools import torch_opd

    real = torch_opd.warmup_cosine_lr
    monkeypatch.setattr(torch_opd, "warmup_cosine_lr", lambda *a, **k: 2 * real(*a, **k))
    student, teacher = tiny_pair
    code, report = _run(["--mode", "train-step", "--student", student, "--teacher", teacher,
                         "--response-length", "12", "--length", "6"], tmp_path, "bad")
    assert code == 1
    failed = {c["check"] for c in report["checks"] if not c["ok"]}
    assert "learning rate rel diff" in failed and any(c.startswith("update: abs diff") for c in failed)
    assert "gradient rel, worst tensor" not in failed


def test_vocabulary_mismatch_is_a_one_line_error(tmp_path, capsys):
    small = tiny_hf_model(seed=1, vocab_size=96)
    small.save_pretrained(tmp_path / "s")
    tiny_hf_model(seed=2).save_pretrained(tmp_path / "t")
    code = compare_torch.main(["--mode", "blend", "--student", str(tmp_path / "s"), "--teacher", str(tmp_path / "t")])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: save_pretrained's progress bars
    assert code == 2 and last.startswith("compare_torch: error: ") and "share the vocabulary" in last


def test_default_prompts_encode_with_the_toy_tokenizer(capsys):
    """The default prompts used to crash on the toy tokenizer ("Missing [UNK] token")."""
    from trb_jax.toy import build

    tok = compare_torch._load_tokenizer(build.ASSETS_DIR / "student")
    args = compare_torch.parse_args(["--toy"])
    rows, source = compare_torch.prompt_rows(tok, args, 111)
    assert source == f"tokenizer, {len(compare_torch.DEFAULT_PROMPTS)} prompts"
    assert [tok.decode(r) for r in rows] == compare_torch.DEFAULT_PROMPTS
    # A prompt outside the closed vocabulary falls back to random ids instead of raising.
    args = compare_torch.parse_args(["--toy", "--prompts", "1 + 2 =", "Grüße {}"])
    rows, source = compare_torch.prompt_rows(tok, args, 111)
    assert "1 not encodable: random ids" in source and len(rows[1]) == args.length


@pytest.mark.parametrize("mode", ["logits", "train-step", "blend"])
def test_modes_on_the_shipped_toy_pair(mode, tmp_path, capsys):
    code, report = _run(["--mode", mode, "--toy"], tmp_path, mode)
    out = capsys.readouterr().out
    assert code == 0, out
    assert all(c["ok"] for c in report["checks"])
    if mode == "logits":
        assert out.count("PASS: max per-token KL") == 2
    else:
        assert report["eos"] == {"stop_id": 0, "eos_ids": [0, 2]}
