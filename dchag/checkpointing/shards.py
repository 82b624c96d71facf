"""How each full parameter is cut for a layout (T, P), without building the distributed model.

A parameter of the serial model is one of (``dchag.parallel.state_dict.shard_kind``):
- ``tensor``: megatron's TP chunk along ``partition_dim`` (T equal chunks);
- ``channel``: dim 0 holds channel rows; channel rank r = TP rank % P holds the rows of its
  channels (N = C rows: ``partition.rank_channels(r)``) or of its groups (N = G x f rows,
  f tokens per group at a tree level: rows [g0 f, g1 f) for its groups [g0, g1)); the T/P
  replicas (TP ranks with the same channel rank) hold copies. In a blend of data sources a
  per-identity parameter (``"identity"`` in its spec) holds the rows of the rank's home ids
  (``cfg.source_layout(P).home_ids(r)``, dchag/parallel/sources.py): one piece per run of them;
- ``replicated``.

:func:`target_maps` turns that into DeepSpeed ``ParamAffineMap`` s (the same ones
``universal_checkpoint_info`` records at save time), whose ``extract`` cuts a rank's shard.
"""

from __future__ import annotations

from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.universal import affine_map
from dchag.parallel.sources import contiguous_range, runs


def param_specs(model) -> dict[str, dict]:
    """{name: {"kind", "shape", "dim" | "global_rows"}} of a serial (T = P = 1) model."""
    from dchag.parallel.state_dict import shard_kind
    out = {}
    for name, p in model.named_parameters():
        kind = shard_kind(p)
        d = {"kind": kind, "shape": list(p.shape)}
        if kind == "tensor":
            d["dim"] = int(p.partition_dim)
        elif kind == "channel":
            d["global_rows"] = int(p.channel_global_rows)
            if model.cfg.sources is not None and getattr(p, "channel_identity", False):
                d["identity"] = True  # a blend: rows of channel identities, held by their home ranks
        out[name] = d
    return out


def channel_rows(partition, global_rows: int, rank: int) -> range:
    """Rows of a channel-sharded parameter with ``global_rows`` rows held by channel rank ``rank``."""
    C, G = partition.num_channels, partition.num_groups
    if global_rows == C:
        return partition.rank_channels(rank)
    if global_rows % G == 0:
        f = global_rows // G
        groups = partition.rank_groups(rank)
        return range(groups.start * f, groups.stop * f)
    raise CheckpointError(f"a channel-sharded parameter with {global_rows} rows fits neither C = {C} channels nor "
                          f"G = {G} groups.")


def rank_descriptions(spec: dict, cfg, T: int, P: int) -> list[dict]:
    """The per-TP-rank descriptions ``dchag.checkpointing.universal.affine_map`` takes."""
    kind, shape = spec["kind"], list(spec["shape"])
    if kind == "replicated" or T == 1:
        return [{"kind": "replicated", "shape": shape}] * T
    if kind == "tensor":
        dim = spec["dim"]
        if shape[dim] % T:
            raise CheckpointError(f"dimension {dim} ({shape[dim]}) of a tensor-parallel parameter is not divisible "
                                  f"by --target-tensor-parallel-size {T}.")
        return [{"kind": "tensor", "dim": dim, "shape": shape[:dim] + [shape[dim] // T] + shape[dim + 1:]}] * T
    out = []
    for r in range(T):
        rows = _rank_rows(spec, cfg, P, r % P)
        held = {"rows": [rows.start, rows.stop]} if isinstance(rows, range) else {"runs": [list(x) for x in runs(rows)]}
        out.append({"kind": "channel", "shape": [len(rows)] + shape[1:], **held, "global_rows": spec["global_rows"]})
    return out


def _rank_rows(spec: dict, cfg, P: int, rank: int):
    """The global rows channel rank ``rank`` holds of a channel-sharded parameter (a range, or a
    blend's sorted home ids)."""
    if cfg.sources is None:
        return channel_rows(cfg.partition(P), spec["global_rows"], rank)
    if spec.get("identity"):
        ids = cfg.source_layout(P).home_ids(rank)
        return contiguous_range(ids) or ids
    G = cfg.num_groups  # a blend's per-segment parameters: rows of the rank's groups, as with one source
    if spec["global_rows"] % G:
        raise CheckpointError(f"a channel-sharded parameter with {spec['global_rows']} rows fits no G = {G} groups.")
    f, k = spec["global_rows"] // G, G // P
    return range(rank * k * f, (rank + 1) * k * f)


def target_maps(specs: dict[str, dict], cfg, T: int, P: int) -> dict:
    """{name: ParamAffineMap} for layout (T, P) (layout errors first, as in training)."""
    cfg.validate_layout(T, P)
    maps = {}
    for name, spec in specs.items():
        amap = affine_map(rank_descriptions(spec, cfg, T, P))
        amap.validate()
        maps[name] = amap
    return maps
