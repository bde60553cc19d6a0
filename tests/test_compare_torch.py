"""The compare_torch CLI (trb_jax.tools.compare_torch), run in-process on tiny checkpoints."""

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
