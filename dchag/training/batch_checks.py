"""Samples with no valid value (every input value NaN/Inf or no-data; for a forecast, every target
value): they contribute nothing to the loss (the losses average over valid values only) and are
counted. When a whole global batch is empty the iteration is skipped on every rank: an update
from a zero gradient would still move the weights (Adam's momentum, weight decay)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def empty_samples(batches: list[dict]) -> tuple[int, int]:
    """(samples without a valid value, samples) over the global batch. Collective: over the
    channel-parallel group (a rank sees only its channels), then the data-parallel group."""
    from megatron.core import parallel_state as ps
    key = "target_valid" if "target_valid" in batches[0] else "valid"
    per_sample = torch.cat([b[key].flatten(1).sum(1) for b in batches]).to(torch.float64)
    if key == "valid" and ps.get_channel_parallel_world_size() > 1:
        dist.all_reduce(per_sample, group=ps.get_channel_parallel_group())
    t = torch.stack([(per_sample == 0).sum().to(torch.float64),
                     torch.tensor(float(per_sample.numel()), dtype=torch.float64, device=per_sample.device)])
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    return int(t[0].item()), int(t[1].item())
