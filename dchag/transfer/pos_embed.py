"""The position embedding on a new tile grid, as ClimaX's ``interpolate_pos_embed`` does it."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """[1, gh * gw, D] on the patch grid ``old_grid`` (row-major) -> [1, gh' * gw', D] on ``new_grid``:
    each of the D features as a gh x gw image, resized bicubically (half-pixel centres,
    ``align_corners=False``, edges clamped), computed in float64."""
    (gh, gw), D = old_grid, pos_embed.shape[-1]
    if pos_embed.shape[-2] != gh * gw:
        raise ValueError(f"position embedding of {pos_embed.shape[-2]} patches for a {gh} x {gw} grid")
    grid = pos_embed.reshape(1, gh, gw, D).permute(0, 3, 1, 2).double()  # [1, D, gh, gw]
    resized = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(1, -1, D).to(pos_embed.dtype)
