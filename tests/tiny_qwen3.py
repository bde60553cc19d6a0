"""Helpers for the Qwen3 tests: tiny random transformers Qwen3 models built in-process.

Imported by tests/test_qwen3.py, test_checkpoint.py, test_sharding.py and test_compare_torch.py
(tests/ is on sys.path under pytest's default rootdir-relative import mode). No downloads.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

# Tiny Qwen3 shapes covering every attention layout: MHA, GQA 2 and 4, MQA, head_dim != d/n,
# tied and untied heads. Keys are test ids.
TINY_VARIANTS: dict[str, dict] = {
    "mha_untied": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False),
    "gqa2_tied_hd16": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True),
    "gqa4_untied_hd4": dict(num_attention_heads=8, num_key_value_heads=2, head_dim=4, tie_word_embeddings=False),
    "mqa_tied_hd16": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=16, tie_word_embeddings=True),
}


def tiny_hf_model(seed: int = 0, **overrides) -> transformers.Qwen3ForCausalLM:
    """A random 2-layer Qwen3ForCausalLM (vocab 128, d 32) in eval mode, float32.

    Weights are redrawn with std 0.2 and norm scales around 1 (not exactly 1) so that a
    swapped or mis-transposed tensor changes the output visibly.
    """
    kwargs = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        max_position_embeddings=256,
    )
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.2)
    return model


def hf_logits(model, input_ids_bt: np.ndarray, attention_mask_bt: np.ndarray | None = None) -> np.ndarray:
    """Float32 NumPy logits from a transformers model; positions skip left padding like ours."""
    ids = torch.tensor(np.asarray(input_ids_bt), dtype=torch.long)
    kwargs = {}
    if attention_mask_bt is not None:
        mask = torch.tensor(np.asarray(attention_mask_bt), dtype=torch.long)
        kwargs = dict(attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    with torch.inference_mode():
        return model(ids, **kwargs).logits.float().numpy()


def left_padded_batch(rng: np.random.Generator, lengths: list[int], vocab: int):
    """(ids_bt int32, mask_bt int32) with rows left-padded to max(lengths); pad id 0."""
    t = max(lengths)
    ids = rng.integers(1, vocab, size=(len(lengths), t)).astype(np.int32)
    mask = np.zeros((len(lengths), t), np.int32)
    for row, n in enumerate(lengths):
        mask[row, t - n :] = 1
        ids[row, : t - n] = 0
    return ids, mask
