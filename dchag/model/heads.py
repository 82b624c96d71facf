"""Task heads on the backbone output [B, L, D]."""

from __future__ import annotations

import math

import torch
from torch import nn

from dchag.model.bank import RowPlan, lend, take
from dchag.model.init import init_rows_, mark_channel_sharded, mark_weight_matrix
from dchag.parallel.comm import copy_to_channel_parallel_region


def unpatchify(x: torch.Tensor, grid: tuple[int, int], patch: int) -> torch.Tensor:
    """[B, c, L, p*p] -> [B, c, H, W] (L = gh * gw patches in row-major order)."""
    B, c, L, _ = x.shape
    gh, gw = grid
    x = x.reshape(B, c, gh, gw, patch, patch).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(B, c, gh * patch, gw * patch)


class ChannelReconstructionHead(nn.Module):
    """MAE head, sharded by channel: predicts only this rank's channels.

    [B, L, D] -> [B, c_r, H, W] with per-channel weights [c_r, p*p, D]. The backbone output is
    replicated across the channel group; ``copy_to_channel_parallel_region`` all-reduces its
    gradient so the backbone sees the sum over all channels' heads. In a blend of data sources
    the rows are those of the rank's home ids and ``plans[source]`` takes the rows of the
    source's slots (dchag/model/bank.py); a repeated slot predicts its channel again.
    """

    def __init__(self, channels: range | tuple[int, ...], num_channels: int, hidden_size: int, patch_dim: int,
                 grid: tuple[int, int], seed: int, owner: bool, plans: tuple[RowPlan, ...] | None = None):
        super().__init__()
        self.grid, self.patch = grid, patch_dim
        c, q = len(channels), patch_dim * patch_dim
        self.plans = plans or (RowPlan.whole(c),)
        self.weight = nn.Parameter(init_rows_(torch.empty(c, q, hidden_size), channels, seed, "head.weight",
                                              std=1.0 / math.sqrt(hidden_size)))
        self.bias = nn.Parameter(torch.zeros(c, q))
        for p in (self.weight, self.bias):
            mark_channel_sharded(p, channels, num_channels, owner, identity=True)
        mark_weight_matrix(self.weight)

    def forward(self, x: torch.Tensor, source: int = 0) -> torch.Tensor:
        x = copy_to_channel_parallel_region(x)
        plan = self.plans[source]
        borrowed = lend((self.weight, self.bias), plan) or (None, None)
        weight, bias = (take(t, plan, None, b) for t, b in zip((self.weight, self.bias), borrowed))
        pred = torch.einsum("bld,cqd->bclq", x, weight) + bias[None, :, None, :]
        return unpatchify(pred, self.grid, self.patch)


class DenseHead(nn.Module):
    """Dense per-pixel head, replicated on every rank: [B, L, D] -> [B, K, H, W].

    One linear map per patch token, D -> K p^2 (weight [K p^2, D], output feature k p^2 + q is
    plane k, pixel q of the patch). K = the forecast's output variables, regress's target maps,
    or segment's class logits. The parameter names (``head.linear.*``) are those of the forecast
    head it generalizes, so earlier checkpoints and exports load unchanged."""

    def __init__(self, hidden_size: int, num_outputs: int, patch_dim: int, grid: tuple[int, int]):
        super().__init__()
        self.grid, self.patch, self.num_outputs = grid, patch_dim, num_outputs
        self.linear = nn.Linear(hidden_size, num_outputs * patch_dim * patch_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        pred = self.linear(x).reshape(B, L, self.num_outputs, -1).transpose(1, 2)  # [B, K, L, p*p]
        return unpatchify(pred, self.grid, self.patch)


def sincos_2d(hidden_size: int, grid: tuple[int, int]) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MAE/ClimaX), [L, D]; half the features encode
    the row, half the column."""
    gh, gw = grid
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / max(quarter, 1))

    def embed(pos):  # [n] -> [n, 2*quarter]
        angles = pos[:, None].double() * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    emb = torch.cat([embed(rows.reshape(-1)), embed(cols.reshape(-1))], dim=1)
    if emb.shape[1] < hidden_size:  # D not a multiple of 4
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], hidden_size - emb.shape[1])], dim=1)
    return emb.float()
