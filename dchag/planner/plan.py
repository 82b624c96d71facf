"""One layout's estimate: memory, communication, FLOPs and a throughput model.

The throughput model is deliberately simple (no overlap of compute and communication, unless
``overlap_dp``: then data-parallel traffic hides behind the backward pass, up to its compute time):

    step time = FLOPs per rank / (peak FLOP/s x efficiency)
              + sum over collectives of bytes sent / bandwidth of the link the group spans
    samples/s = DP x micro batch / step time

A TP/channel group that fits in a node uses the intra-node bandwidth, otherwise the inter-node
one; data-parallel groups use the inter-node bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dchag.planner.comm import Collective, collectives, summarize
from dchag.planner.flops import forward_flops, step_flops
from dchag.planner.memory import MemoryEstimate, estimate_memory
from dchag.planner.spec import LayoutSpec, ModelSpec

GB = 1e9


@dataclass(frozen=True)
class Hardware:
    """Defaults: one Frontier MI250X GCD (64 GB HBM, 191.5 TFLOP/s bf16 dense peak), 8 per node."""
    memory_gb: float = 64.0
    peak_tflops: float = 191.5
    efficiency: float = 0.35  # fraction of peak the matmuls reach
    gpus_per_node: int = 8
    intra_node_gbs: float = 50.0  # GB/s per GPU, inside a node (Infinity Fabric)
    inter_node_gbs: float = 12.5  # GB/s per GPU across nodes (4 x 25 GB/s NICs per 8 GCDs)
    reserve_gb: float = 4.0  # runtime, allocator fragmentation, communication buffers
    overlap_dp: bool = False  # data-parallel gradient traffic hidden behind backward compute (ZeRO overlap_comm)

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gb - self.reserve_gb) * GB


@dataclass
class Plan:
    model: ModelSpec
    layout: LayoutSpec
    memory: MemoryEstimate
    colls: list[Collective]
    flops: float
    flops_breakdown: dict[str, float]
    step_time_s: float = 0.0
    compute_time_s: float = 0.0
    comm_time_s: float = 0.0
    fits: bool = True
    hardware: Hardware = field(default_factory=Hardware)

    @property
    def samples_per_s(self) -> float:
        return self.layout.data_parallel * self.layout.micro_batch_size / self.step_time_s

    @property
    def comm_bytes(self) -> float:
        return sum(c.sent_bytes for c in self.colls)

    def comm_summary(self, channel_stage_only: bool = False) -> dict:
        return summarize(self.colls, channel_stage_only)


def _bandwidth(group: str, layout: LayoutSpec, hw: Hardware) -> float:
    if group in ("tp", "cp"):
        size = layout.tensor_parallel if group == "tp" else layout.channel_parallel
        return (hw.intra_node_gbs if size <= hw.gpus_per_node else hw.inter_node_gbs) * GB
    return (hw.intra_node_gbs if layout.world_size <= hw.gpus_per_node else hw.inter_node_gbs) * GB


def make_plan(model: ModelSpec, layout: LayoutSpec, hw: Hardware | None = None) -> Plan:
    hw = hw or Hardware()
    mem = estimate_memory(model, layout)
    colls = collectives(model, layout)
    flops = step_flops(model, layout)
    plan = Plan(model, layout, mem, colls, flops, forward_flops(model, layout), hardware=hw)
    plan.compute_time_s = flops / (hw.peak_tflops * 1e12 * hw.efficiency)
    times = [(c, c.sent_bytes / _bandwidth(c.group, layout, hw)) for c in colls]
    plan.comm_time_s = sum(t for _, t in times)
    if hw.overlap_dp:  # up to the backward's compute time (2/3 of the step's FLOPs) is hidden
        dp = sum(t for c, t in times if c.group == "dp")
        plan.comm_time_s -= min(dp, 2.0 / 3.0 * plan.compute_time_s)
    plan.step_time_s = plan.compute_time_s + plan.comm_time_s
    plan.fits = mem.total <= hw.usable_bytes
    return plan
