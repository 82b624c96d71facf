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
