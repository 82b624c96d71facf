"""A LayerNorm on every group token (``--dchag-group-norm layernorm``): the partial stage's output
[B, G/P, L, D] normalized over D at each position, with a scale and shift per group.

    out_g = (y_g - mean_D y_g) / sqrt(var_D y_g + eps) * gamma_g + beta_g        y_g: group g's token

It gives the channel stage a per-position nonlinearity before the final aggregation (D-CHAG-L's
group token is otherwise linear in the group's channels), tried for the MAE gap of docs/PARITY.md.
gamma starts at 1 and beta at 0 (no draw: the same on every layout); rows shard by group like
the partial stage's output.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dchag.model.init import mark_channel_sharded


class GroupTokenNorm(nn.Module):
    def __init__(self, groups: range, num_groups: int, hidden_size: int, owner: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(len(groups), hidden_size))
        self.bias = nn.Parameter(torch.zeros(len(groups), hidden_size))
        for p in (self.weight, self.bias):
            mark_channel_sharded(p, groups, num_groups, owner)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, G/P, L, D] -> the same
        normed = F.layer_norm(tokens, tokens.shape[-1:], eps=self.eps)
        return normed * self.weight[None, :, None, :].to(normed.dtype) + self.bias[None, :, None, :].to(normed.dtype)
