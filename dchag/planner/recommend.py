"""Search layouts for a GPU count and memory budget; keep those that fit, best throughput first.

Searched: aggregation (flat = TP alone with P = 1; linear / cross = D-CHAG), G, T (divisors of
the GPU count up to ``max_tp`` that split heads and FFN), P (divisors of T dividing G), ZeRO
stage (0 only when DP = 1), activation recompute. DP = GPUs / T; micro batch fixed.
"""

from __future__ import annotations

from dataclasses import dataclass

from dchag.model.config import default_channel_chunk
from dchag.planner.plan import Hardware, Plan, make_plan
from dchag.planner.spec import LayoutSpec, ModelSpec, PlanError


@dataclass
class Recommendation:
    best: Plan | None
    fitting: list[Plan]  # best first
    rejected: int  # layouts searched that do not fit
    best_tp_alone: Plan | None  # the fastest fitting flat (TP alone) layout, for comparison
    smallest: Plan | None  # the least memory of all layouts searched (when nothing fits)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_groups(model: ModelSpec, P: int, groups: tuple[int, ...] | None) -> list[int]:
    if groups:
        return [g for g in groups if g % P == 0 and g <= model.C]
    return sorted({g for g in (P, 2 * P, 4 * P, 8 * P) if g <= model.C})


def recommend(model: ModelSpec, num_gpus: int, hw: Hardware | None = None, *,
              aggregations: tuple[str, ...] = ("flat", "linear", "cross"), groups: tuple[int, ...] | None = None,
              max_tp: int = 64, zero_stages: tuple[int, ...] = (0, 1, 2, 3), recompute: tuple[bool, ...] = (False, True),
              precision: str = "bf16", micro_batch_size: int = 1, sequence_parallel: bool = False,
              channel_parallel: str = "any", tree_levels: int = 1, channel_chunk: int | None = None) -> Recommendation:
    """``channel_parallel``: "any" (every P | T), or "T" (P = T only, the paper's layout);
    ``channel_chunk``: K of the streamed channel stage (None: pretrain_dchag.py's default per aggregation)."""
    hw = hw or Hardware()
    if num_gpus < 1:
        raise PlanError(f"GPU count must be >= 1, got {num_gpus}.")
    if hw.usable_bytes <= 0:
        raise PlanError(f"memory budget {hw.memory_gb} GB leaves nothing after the {hw.reserve_gb} GB reserve.")
    fitting, rejected, smallest = [], 0, None
    for agg in aggregations:
        for T in _divisors(num_gpus):
            if T > max_tp or model.num_attention_heads % T or model.F % T:
                continue
            if sequence_parallel and model.L % T:
                continue
            DP = num_gpus // T
            Ps = [1] if agg == "flat" else ([T] if channel_parallel == "T" else _divisors(T))
            for P in Ps:
                Gs = [model.C] if agg == "flat" else candidate_groups(model, P, groups)
                for G in Gs:
                    try:
                        m = model.with_(aggregation=agg, groups=G if agg != "flat" else model.groups,
                                        tree_levels=tree_levels if agg != "flat" else 1,
                                        channel_chunk=0 if agg == "flat" else default_channel_chunk(agg, channel_chunk))
                    except PlanError:
                        continue
                    for z in zero_stages:
                        if DP == 1 and z > 0:
                            continue
                        for rc in recompute:
                            layout = LayoutSpec(T, P, DP, z, precision, rc, sequence_parallel, micro_batch_size)
                            try:
                                plan = make_plan(m, layout, hw)
                            except PlanError:
                                continue
                            if smallest is None or plan.memory.total < smallest.memory.total:
                                smallest = plan
                            if plan.fits:
                                fitting.append(plan)
                            else:
                                rejected += 1
    fitting.sort(key=lambda p: (-p.samples_per_s, p.memory.total))
    tp_alone = next((p for p in fitting if p.model.aggregation == "flat"), None)
    return Recommendation(fitting[0] if fitting else None, fitting, rejected, tp_alone, smallest)
