"""Shared helpers for model tests that run inside spawned ranks."""

from __future__ import annotations

import torch

import megatron_patches
from dchag.model.config import DChagConfig


def setup_layout(tp: int, cp: int, seed: int = 1234):
    from megatron.core import parallel_state as ps, tensor_parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(tp, cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def layouts(world: int, groups: int):
    """Every (T, P) with T | world, T and P in {1, 2, 4}, P | T, P | G."""
    return [(t, p) for t in (1, 2, 4) if world % t == 0 for p in (1, 2, 4) if t % p == 0 and groups % p == 0]


def tiny_config(**overrides) -> DChagConfig:
    base = dict(num_channels=13, img_h=8, img_w=8, patch_dim=2, hidden_size=32, num_layers=2,
                num_attention_heads=4, ffn_hidden_size=64, aggregation="linear", groups=4)
    base.update(overrides)
    return DChagConfig(**base)


def perturb_(model: torch.nn.Module, seed: int):
    """Make zero-initialized biases (and everything else) non-trivial, reproducibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def random_batch(cfg: DChagConfig, seed: int = 7, batch: int = 2):
    """(images [B, C, H, W], MAE patch mask [B, L] or None, forecast lead times [B] or None, loss
    weights over the output [B, C or V, H, W]) for a loss sum(out * weights) that every output
    element feeds."""
    gen = torch.Generator().manual_seed(seed)
    C = cfg.num_channels
    images = torch.randn(batch, C, cfg.img_h, cfg.img_w, generator=gen)
    mask = (torch.rand(batch, cfg.num_patches, generator=gen) < 0.5) if cfg.task == "mae" else None
    lead = torch.tensor([1.0, 6.0] * (batch // 2)) if cfg.task == "forecast" else None
    n_out = C if cfg.task == "mae" else len(cfg.predicted_channels)
    weights = torch.randn(batch, n_out, cfg.img_h, cfg.img_w, generator=gen)
    return images, mask, lead, weights
