"""Masked autoencoding: random patch masks and the masked-patch MSE over valid pixels."""

from __future__ import annotations

import torch

from dchag.parallel.comm import reduce_from_channel_parallel_region


def patch_mask(index: torch.Tensor, num_patches: int, mask_ratio: float, seed: int, iteration: int) -> torch.Tensor:
    """[B, L] bool (True = masked). Each sample's mask depends only on (seed, sample index,
    iteration): identical on every rank and every layout."""
    n_mask = int(round(mask_ratio * num_patches))
    rows = []
    for i in index.tolist():
        g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(i) * 7919 + int(iteration) * 104_729) % (2**63))
        perm = torch.randperm(num_patches, generator=g)
        m = torch.zeros(num_patches, dtype=torch.bool)
        m[perm[:n_mask]] = True
        rows.append(m)
    return torch.stack(rows)


def pixel_mask(mask: torch.Tensor, grid: tuple[int, int], patch_dim: int) -> torch.Tensor:
    """[B, L] -> [B, 1, H, W]."""
    gh, gw = grid
    m = mask.reshape(-1, gh, gw)
    return m.repeat_interleave(patch_dim, 1).repeat_interleave(patch_dim, 2)[:, None]


def mae_loss(pred: torch.Tensor, images: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
             grid: tuple[int, int], patch_dim: int) -> torch.Tensor:
    """Global mean over masked patches and valid pixels of all channels (this rank holds c_r)."""
    w = (pixel_mask(mask, grid, patch_dim) & valid).to(torch.float32)
    target = torch.where(valid, images, torch.zeros_like(images)).to(torch.float32)
    err = (pred.to(torch.float32) - target) ** 2 * w
    s = torch.stack([err.sum(), w.sum()])
    s = reduce_from_channel_parallel_region(s)
    return s[0] / s[1].clamp_min(1.0)
