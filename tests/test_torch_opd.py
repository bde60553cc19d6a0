"""The PyTorch OPD / TRB reference of compare_torch (trb_jax/tools/torch_opd.py), checked from the
method's own numbers: the spec's worked example, hand-computed losses, the schedule's definition."""

import math

import numpy as np
import optax
import pytest
import torch

from trb_jax.tools import torch_opd


class _Eos:
    stop_id = 1
    eos_ids = (1, 3)


def test_trb_blend_reproduces_the_worked_example():
    # pi_S = [0.7, 0.3], pi_T = [0.2, 0.8] (the spec's exact float64 numbers)
    s = torch.log(torch.tensor([[0.7, 0.3]] * 4, dtype=torch.float64))
    t = torch.log(torch.tensor([[0.2, 0.8]] * 4, dtype=torch.float64))
    eps = torch.tensor([0.001, 0.01, 0.05, 0.1], dtype=torch.float64)
    out = torch_opd.trb_blend(s, t, 0.0, iters=100)  # eps = 0: beta* = 0, mu* = pi_S
    assert torch.all(out["beta"] == 0) and torch.allclose(out["log_mu"], out["log_s"])
    betas = [float(torch_opd.trb_blend(s[i], t[i], float(eps[i]))["beta"]) for i in range(4)]
    np.testing.assert_allclose(betas, [0.04315, 0.13341, 0.29000, 0.40555], atol=5e-6)
    kl, log_mu = torch_opd.blend_kl(torch.log_softmax(s[0], -1), torch.log_softmax(t[0], -1),
                                    torch.tensor(0.25, dtype=torch.float64))
    np.testing.assert_allclose(log_mu.exp().numpy(), [0.5717, 0.4283], atol=5e-5)
    assert abs(float(kl) - 0.0367) < 5e-5
    one = torch_opd.trb_blend(s[0], t[0], 0.6)  # KL(pi_T || pi_S) = 0.534111 <= 0.6: mu* = pi_T
    assert float(one["beta"]) == 1.0 and abs(float(one["kl"]) - 0.534111) < 1e-6


def test_merge_eos_moves_all_stop_mass_to_the_stop_slot():
    z = torch.randn(2, 3, 6, dtype=torch.float64)
    merged = torch_opd.merge_eos(z, _Eos)
    p, q = torch.softmax(z, -1), torch.softmax(merged, -1)
    assert torch.all(torch.isneginf(merged[..., 3]))
    torch.testing.assert_close(q[..., 1], p[..., 1] + p[..., 3])
    torch.testing.assert_close(q[..., [0, 2, 4, 5]], p[..., [0, 2, 4, 5]])


@pytest.mark.parametrize("renormalize", [True, False])
def test_opd_token_loss_by_hand(renormalize):
    rng = np.random.default_rng(0)
    zs, zt = rng.normal(size=(2, 3, 10)), rng.normal(size=(2, 3, 10))
    zs[0, 0, 4] = zs[0, 0, 5]  # a tie at the support's edge goes to the lower id
    s = torch.tensor(zs, requires_grad=True)
    loss, ids = torch_opd.opd_token_loss(s, torch.tensor(zt), top_k=4, eos=_Eos, renormalize=renormalize)
    for b in range(2):
        for j in range(3):
            ls = torch_opd.log_probs(torch.tensor(zs[b, j]), _Eos).numpy()
            lt = torch_opd.log_probs(torch.tensor(zt[b, j]), _Eos).numpy()
            order = sorted(range(10), key=lambda i: (-ls[i], i))[:4]
            assert list(ids[b, j].numpy()) == order
            a, c = ls[order], lt[order]
            if renormalize:
                a, c = a - np.logaddexp.reduce(a), c - np.logaddexp.reduce(c)
            np.testing.assert_allclose(float(loss[b, j].detach()), np.sum(np.exp(a) * (a - c)), rtol=1e-12)
    torch_opd.masked_mean(loss, np.array([[1, 1, 0], [0, 1, 0]])).backward()
    assert torch.all(s.grad[0, 2] == 0) and torch.all(s.grad[1, 0] == 0) and s.grad[0, 0].abs().sum() > 0


def test_warmup_cosine_lr_matches_the_optax_schedule():
    for warmup in (0, 3):
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0 if warmup else 1e-3, peak_value=1e-3, warmup_steps=warmup, decay_steps=10,
            end_value=1e-4)
        for step in (0, 1, 3, 5, 9, 10, 12):
            ours = torch_opd.warmup_cosine_lr(step, peak_lr=1e-3, warmup_steps=warmup, decay_steps=10,
                                              end_lr_fraction=0.1)
            assert math.isclose(ours, float(schedule(step)), rel_tol=1e-6, abs_tol=1e-12), (warmup, step)
