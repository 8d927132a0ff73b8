"""MODPO loss against the formula in ARCHITECTURE.md."""
import math

import pytest
import torch

from alignment.losses import dpo_loss, modpo_loss, weighted_mean


def _formula(cw, cr, m, w, beta):
    z = (beta / w) * (cw - cr) - m / w
    return -math.log(1 / (1 + math.exp(-z)))


@pytest.mark.parametrize("w", [0.5, 1 / 6, 0.9])
def test_modpo_matches_formula_with_nonzero_margin(w):
    cw, cr, m, beta = torch.tensor([1.3, -0.2]), torch.tensor([0.4, 0.7]), torch.tensor([0.8, -0.35]), 0.1
    got = modpo_loss(cw, cr, m, w, beta)
    for i in range(2):
        assert got[i].item() == pytest.approx(_formula(cw[i].item(), cr[i].item(), m[i].item(), w, beta), rel=1e-6)
    assert not torch.allclose(got, modpo_loss(cw, cr, torch.zeros(2), w, beta))


def test_dpo_is_modpo_with_unit_weight_and_no_margin():
    cw, cr = torch.randn(5), torch.randn(5)
    assert torch.allclose(dpo_loss(cw, cr, 0.2), -torch.nn.functional.logsigmoid(0.2 * (cw - cr)))


def test_zero_primary_weight_is_rejected():
    with pytest.raises(ValueError, match="w_k"):
        modpo_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), 0.0, 0.1)


def test_weighted_mean_is_weighted_sum_over_objectives():
    losses, weights = torch.tensor([1.0, 3.0]), torch.tensor([0.25, 0.75])
    assert weighted_mean(losses, weights).item() == pytest.approx(2.5)
