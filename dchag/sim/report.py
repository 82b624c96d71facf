"""The simulation beside the planner's prediction: a table for the terminal and a JSON record."""

from __future__ import annotations

from dchag.planner.comm import summarize
from dchag.planner.plan import GB, make_plan
from dchag.planner.spec import LayoutSpec, ModelSpec
from dchag.planner.table import format_table
from dchag.sim.step import SimSpec


def planner_specs(spec: SimSpec) -> tuple[ModelSpec, LayoutSpec]:
    c = spec.cfg
    model = ModelSpec(num_layers=c.num_layers, hidden_size=c.hidden_size, num_attention_heads=c.num_attention_heads,
                      num_channels=c.num_channels, img_h=c.img_h, img_w=c.img_w, patch_dim=c.patch_dim,
                      ffn_hidden_size=c.ffn_hidden_size, aggregation=c.aggregation,
                      groups=c.groups if c.aggregation != "flat" else 8, tree_levels=c.tree_levels,
                      channel_chunk=c.channel_chunk, task=c.task,
                      out_channels=len(c.predicted_channels) if c.task == "forecast" else None,
                      attention_backend=c.attention_backend,
                      source_channels=None if c.sources is None else tuple(len(ids) for ids in c.sources))
    layout = LayoutSpec(spec.tensor_parallel, spec.channel_parallel, spec.data_parallel, spec.zero_stage,
                        "bf16" if c.bf16 else "fp32", c.recompute_activations, c.sequence_parallel,
                        spec.micro_batch_size)
    return model, layout


def spec_from_plan(plan, rank: int = 0) -> SimSpec:
    """The simulation of a planner layout (rank 0 holds the most channels, the planner's rank)."""
    from dchag.model.config import DChagConfig
    m, lay = plan.model, plan.layout
    cfg = DChagConfig(num_channels=m.C, img_h=m.img_h, img_w=m.img_w, patch_dim=m.patch_dim, hidden_size=m.D,
                      num_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
                      ffn_hidden_size=m.ffn_hidden_size, aggregation=m.aggregation,
                      groups=m.groups if m.aggregation != "flat" else 1, tree_levels=m.tree_levels,
                      channel_chunk=m.channel_chunk, task=m.task,
                      out_channels=tuple(range(m.out_channels)) if m.task == "forecast" and m.out_channels else None,
                      recompute_activations=lay.recompute, sequence_parallel=lay.sequence_parallel,
                      bf16=lay.precision == "bf16", attention_backend=m.attention_backend,
                      sources=None if m.source_channels is None else tuple(
                          tuple(range(sum(m.source_channels[:s]), sum(m.source_channels[:s + 1])))
                          for s in range(len(m.source_channels))))
    return SimSpec(cfg, world_size=lay.world_size, rank=rank, tensor_parallel=lay.tensor_parallel,
                   channel_parallel=lay.channel_parallel, zero_stage=lay.zero_stage,
                   micro_batch_size=lay.micro_batch_size)


def compare(spec: SimSpec, sim: dict) -> dict:
    """The JSON record: simulated and predicted figures side by side (bytes, and GB = 1e9 bytes)."""
    model, layout = planner_specs(spec)
    plan = make_plan(model, layout)
    m = plan.memory
    planned_colls = summarize(plan.colls)
    sim_colls = sim["collectives"]["by_phase"]
    phases = sorted(set(planned_colls) | set(sim_colls))
    collectives = {ph: {"simulated": {k: sim_colls.get(ph, {}).get(k, 0) for k in ("calls", "payload_bytes", "sent_bytes")},
                        "simulated_by_kind": sim_colls.get(ph, {}).get("by_kind", {}),
                        "planner": {k: planned_colls.get(ph, {}).get(k, 0) for k in ("calls", "payload_bytes", "sent_bytes")}}
                   for ph in phases}
    c = spec.cfg
    direct = layout.precision == "fp32" and layout.zero_stage == 0  # torch AdamW on the parameters
    partition_grad = 0 if direct else 4 * -(-m.param_numel // (layout.data_parallel if layout.zero_stage else 1))
    return {
        "config": {"num_channels": c.num_channels, "img_h": c.img_h, "img_w": c.img_w, "patch_dim": c.patch_dim,
                   "hidden_size": c.hidden_size, "num_layers": c.num_layers,
                   "num_attention_heads": c.num_attention_heads, "ffn_hidden_size": c.ffn_size,
                   "aggregation": c.aggregation, "groups": c.num_groups, "tree_levels": c.tree_levels, "task": c.task,
                   "bf16": c.bf16, "recompute_activations": c.recompute_activations,
                   "sequence_parallel": c.sequence_parallel, "zero_stage": spec.zero_stage,
                   "micro_batch_size": spec.micro_batch_size,
                   "sources": None if c.sources is None else [len(ids) for ids in c.sources]},
        "layout": sim["layout"],
        "simulated_peak_gb": sim["peak_bytes"] / GB,
        "planner_peak_gb": m.total / GB,
        "planner_peak_phase": m.peak_phase,
        "simulated_peak_where": sim["peak_where"],
        "params_per_rank": sim["params_per_rank"],
        "planner_params_per_rank": m.param_numel,
        "memory_bytes": {
            "simulated": {"params": sim["param_bytes"], "grads": sim["grad_bytes"],
                          "partition_grad": sim["partition_grad_bytes"], "optimizer": sim["optimizer_bytes"],
                          "data": sim["data_bytes"], "saved_activations": sim["saved_activation_bytes"],
                          "peak": sim["peak_bytes"], "peak_by_category": sim["peak_by_category"]},
            "planner": {"params": m.params, "grads": m.grads, "partition_grad": partition_grad,
                        "optimizer": m.optimizer, "data": m.data,
                        "saved_activations": m.activation_total, "activations": m.activations,
                        "peak": m.total},
        },
        "collectives": collectives,
        "collective_calls": [{k: r[k] for k in ("op", "kind", "phase", "group_size", "payload_bytes", "sent_bytes",
                                                 "shape")} for r in sim["collectives"].get("records", [])],
        "seconds": sim["seconds"],
        "build_seconds": sim["build_seconds"],
    }


def _gb(x: float) -> str:
    return f"{x / GB:.3f}"


def _diff(sim: float, plan: float) -> str:
    if not plan:
        return "" if not sim else "n/a"
    return f"{100.0 * (plan - sim) / sim:+.1f} %" if sim else "n/a"


def table(record: dict) -> str:
    ms, mp = record["memory_bytes"]["simulated"], record["memory_bytes"]["planner"]
    lay, cfg = record["layout"], record["config"]
    head = (f"rank {lay['rank']} of {lay['world_size']} (T={lay['T']} P={lay['P']} DP={lay['DP']}; tp rank "
            f"{lay['tp_rank']}, channel rank {lay['cp_rank']}, channels {lay['channels'][0]}..{lay['channels'][1] - 1}"
            + (f" of source {lay['source']}, {lay['channel_rows']} channel rows held" if cfg.get("sources") else "") + "), "
            f"{cfg['aggregation']} G={cfg['groups']}, {'bf16' if cfg['bf16'] else 'fp32'}, ZeRO-{cfg['zero_stage']}, "
            f"micro batch {cfg['micro_batch_size']}; simulated in {record['seconds']:.1f} s")
    rows = [["parameters (count)", f"{record['params_per_rank']:,}", f"{record['planner_params_per_rank']:,}",
             _diff(record["params_per_rank"], record["planner_params_per_rank"])]]
    for name, key in (("parameters GB", "params"), ("gradients GB", "grads"),
                      ("fp32 partition gradient GB", "partition_grad"), ("optimizer state GB", "optimizer"),
                      ("input batch GB", "data"), ("saved activations GB", "saved_activations"), ("peak GB", "peak")):
        rows.append([name, _gb(ms[key]), _gb(mp[key]), _diff(ms[key], mp[key])])
    mem = format_table(["per rank", "simulated", "planner", "planner vs sim"], rows)
    cat = ", ".join(f"{k.lower()} {v / GB:.3f}" for k, v in ms["peak_by_category"].items() if v and k != "Total")
    crow = []
    for ph, d in record["collectives"].items():
        s, p = d["simulated"], d["planner"]
        crow.append([ph, s["calls"], p["calls"], f"{s['payload_bytes'] / 2**20:.2f}", f"{p['payload_bytes'] / 2**20:.2f}",
                     f"{s['sent_bytes'] / 2**20:.2f}", f"{p['sent_bytes'] / 2**20:.2f}"])
    coll = format_table(["phase", "calls sim", "calls plan", "payload MiB sim", "payload MiB plan", "sent MiB sim",
                         "sent MiB plan"], crow or [["-", 0, 0, "0", "0", "0", "0"]])
    return "\n\n".join([head, mem, f"simulated peak by category (MemTracker, GB): {cat}\nsimulated peak at "
                        f"{record['simulated_peak_where']}; planner's at {record['planner_peak_phase']}", coll])
