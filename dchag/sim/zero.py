"""What a rank holds for the optimizer under ZeRO 0/1/2, emulated on (fake) tensors.

DeepSpeed cannot run on fake tensors, so its data structures are rebuilt here with their sizes
(``deepspeed/runtime/zero/stage_1_and_2.py``), N = the rank's parameter count, DP = data-parallel
size, Z = DP for ZeRO >= 1 and 1 for ZeRO-0, n = ceil(N / Z) the rank's partition:

    gradients   the model's gradients in its dtype; ZeRO-0/1 reduce them at the step, bucket by
                bucket (all-reduce for ZeRO-0, reduce-scatter for ZeRO-1); ZeRO-2 reduce-scatters
                each bucket as soon as it is full during backward and frees the bucket's gradients
    buckets     ``reduce_bucket_size`` elements (DeepSpeed's default 5e8), a flat copy of the
                gradients being reduced, padded to a multiple of DP
    master      an fp32 flat partition [n] (DeepSpeed clones the partition in fp32 runs too; fp32
                ZeRO-0 is torch's AdamW on the parameters) and its fp32 gradient [n], alive from the
                gradient reduction to the end of the step
    Adam        exp_avg, exp_avg_sq [n] fp32, created by a real ``torch.optim.AdamW`` step
    all-gather  ZeRO >= 1: the updated partition, cast to the parameter dtype, gathered bucket by
                bucket into the parameters

ZeRO-3 (parameters partitioned and gathered layer by layer by DeepSpeed's hooks) is not emulated.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dchag.bench.measure import phase

DEFAULT_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size / allgather_bucket_size default


class ZeroEmulator:
    def __init__(self, params: list[torch.nn.Parameter], stage: int, dp_group, bucket_size: int = DEFAULT_BUCKET,
                 lr: float = 1e-4):
        if stage not in (0, 1, 2):
            raise ValueError(f"ZeRO stage {stage} is not simulated (0, 1, 2 are); ZeRO-3's parameter partitioning "
                             "runs in DeepSpeed's hooks: use the planner (tools/estimate_memory.py) for it.")
        self.params = [p for p in params if p.requires_grad]
        self.stage, self.group, self.bucket_size = stage, dp_group, int(bucket_size)
        self.dp = dist.get_world_size(dp_group)
        self.dp_rank = dist.get_rank(dp_group)
        self.numel = sum(p.numel() for p in self.params)
        self.shards = self.dp if stage >= 1 else 1
        self.partition = math.ceil(self.numel / self.shards)
        self.dtype = self.params[0].dtype
        self.direct = self.dtype == torch.float32 and stage == 0  # torch AdamW on the parameters themselves
        self.lr = lr
        self.master = None
        self.optimizer = None
        self._pending: list[torch.nn.Parameter] = []
        self._offset = 0  # where the next reduced bucket lands in the partition gradient
        self._hooks = []
        if stage == 2:
            self._hooks = [p.register_post_accumulate_grad_hook(self._grad_ready) for p in self.params]

    # -- state
    def _ensure_master(self):
        if self.direct:
            return
        if self.master is None:
            self.master = torch.nn.Parameter(torch.empty(self.partition, dtype=torch.float32))
        if self.master.grad is None:  # the partition's fp32 gradient lives from the reduction to the step
            self.master.grad = torch.zeros(self.partition, dtype=torch.float32)

    def tensors(self) -> list[torch.Tensor]:
        """Long-lived tensors (for a memory tracker's ``track_external``)."""
        return [self.master] if self.master is not None else []

    # -- gradient reduction
    def _grad_ready(self, p):
        self._pending.append(p)
        if sum(q.numel() for q in self._pending) >= self.bucket_size:
            self._flush()

    def _flush(self):
        if not self._pending:
            return
        self._ensure_master()
        with phase("optimizer"):
            n = sum(p.numel() for p in self._pending)
            padded = math.ceil(n / self.dp) * self.dp if self.stage >= 1 else n
            flat = torch.cat([p.grad.reshape(-1) for p in self._pending] +
                             ([self._pending[0].grad.new_zeros(padded - n)] if padded > n else []))
            if self.stage == 0:
                if self.dp > 1:
                    dist.all_reduce(flat, group=self.group)
                if not self.direct:
                    take = min(n, self.partition - self._offset)
                    self.master.grad[self._offset:self._offset + take].copy_(flat[:take])
                    self._offset += take
            else:
                shard = flat.new_empty(padded // self.dp)
                if self.dp > 1:
                    dist.reduce_scatter_tensor(shard, flat, group=self.group)
                else:
                    shard.copy_(flat)
                take = min(shard.numel(), self.partition - self._offset)
                self.master.grad[self._offset:self._offset + take].add_(shard[:take])
                self._offset += take
            del flat
            if not self.direct:
                for p in self._pending:
                    p.grad = None
        self._pending = []

    def reduce_gradients(self):
        """After backward: reduce whatever is not reduced yet (all of it for ZeRO 0/1)."""
        if self.stage < 2:
            bucket = []
            for p in self.params:
                if p.grad is None:
                    continue
                bucket.append(p)
                if sum(q.numel() for q in bucket) >= self.bucket_size:
                    self._pending = bucket
                    self._flush()
                    bucket = []
            self._pending = bucket
        self._flush()
        self._offset = 0

    # -- update
    def step(self):
        with phase("optimizer"):
            if self.optimizer is None:
                target = self.params if self.direct else [self._master_for_step()]
                self.optimizer = torch.optim.AdamW(target, lr=self.lr, foreach=False)
            self.optimizer.step()
            if self.stage >= 1:
                self._all_gather_params()

    def _master_for_step(self):
        self._ensure_master()
        return self.master

    def _all_gather_params(self):
        # bucket by bucket: [the partition's slice in the parameter dtype] -> [DP x slice]
        per_rank = max(1, self.bucket_size // self.dp)
        for start in range(0, self.partition, per_rank):
            piece = self.master[start:start + per_rank].detach().to(self.dtype)
            out = piece.new_empty(piece.numel() * self.dp)
            if self.dp > 1:
                dist.all_gather_into_tensor(out, piece, group=self.group)
            del piece, out

    def zero_grad(self):
        for p in self.params:
            p.grad = None
        if self.master is not None:
            self.master.grad = None

    def remove_hooks(self):
        for h in self._hooks:
            h.remove()
        self._hooks = []
