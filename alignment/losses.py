"""Preference losses as pure functions of log-ratios. MODPO (ARCHITECTURE.md) generalises DPO:

    loss = -log sigmoid( (beta / w_k) * (logratio(y_w) - logratio(y_l))  -  (1 / w_k) * margin )

with margin = w_-k . (r_-k(x, y_w) - r_-k(x, y_l)). DPO is w_k = 1, margin = 0.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def modpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
               margin: torch.Tensor, w_primary: torch.Tensor | float, beta: float) -> torch.Tensor:
    """Per-pair MODPO loss (no reduction)."""
    w = torch.as_tensor(w_primary, dtype=chosen_logratios.dtype, device=chosen_logratios.device)
    if torch.any(w <= 0):
        raise ValueError("the primary objective's weight w_k must be > 0")
    logits = (beta / w) * (chosen_logratios - rejected_logratios) - margin.to(chosen_logratios) / w
    return -F.logsigmoid(logits)


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair sigmoid DPO loss: MODPO with w_k = 1 and no margin."""
    return modpo_loss(chosen_logratios, rejected_logratios, torch.zeros_like(chosen_logratios), 1.0, beta)


def weighted_mean(per_pair: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Joint-loss DPO: each pair carries its objective's weight w_k; sum_k w_k L_k up to a constant."""
    weight = weight.to(per_pair)
    return (per_pair * weight).sum() / weight.sum().clamp_min(1e-12)
