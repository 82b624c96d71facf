"""The DeepSpeed JSON, filled from the command line (one source of truth; conflicts are errors)."""

from __future__ import annotations

import json


class ConfigError(ValueError):
    """A DeepSpeed JSON value conflicts with the command line."""


def _set(cfg: dict, key: str, value, flag: str, path: str) -> None:
    if key in cfg and cfg[key] != "auto" and cfg[key] != value:
        raise ConfigError(f"DeepSpeed config {path} sets {key}={cfg[key]!r} but the command line gives "
                          f"{flag} -> {value!r}; remove it from the JSON or make them agree.")
    cfg[key] = value


def build_ds_config(args, data_parallel_size: int) -> dict:
    path = args.deepspeed_config or "<default>"
    cfg: dict = {}
    if args.deepspeed_config:
        with open(args.deepspeed_config) as f:
            cfg = json.load(f)
    mbs, gbs = args.micro_batch_size, args.global_batch_size
    if gbs % (mbs * data_parallel_size):
        raise ConfigError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs} x "
                          f"data-parallel size {data_parallel_size}.")
    _set(cfg, "train_micro_batch_size_per_gpu", mbs, "--micro-batch-size", path)
    _set(cfg, "train_batch_size", gbs, "--global-batch-size", path)
    _set(cfg, "gradient_accumulation_steps", gbs // (mbs * data_parallel_size),
         "--global-batch-size / (--micro-batch-size x DP)", path)
    _set(cfg, "gradient_clipping", float(args.clip_grad), "--clip-grad", path)
    bf16 = dict(cfg.get("bf16", {}))
    if "enabled" in bf16 and bf16["enabled"] != "auto" and bool(bf16["enabled"]) != bool(args.bf16):
        raise ConfigError(f"DeepSpeed config {path} sets bf16.enabled={bf16['enabled']!r} but the command line "
                          f"gives --bf16 -> {bool(args.bf16)!r}; remove it from the JSON or make them agree.")
    bf16["enabled"] = bool(args.bf16)
    cfg["bf16"] = bf16
    if cfg.get("fp16", {}).get("enabled") is True:
        raise ConfigError(f"DeepSpeed config {path} enables fp16: use --bf16 (fp16 is not supported).")
    zero = dict(cfg.get("zero_optimization", {}))
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero.setdefault("stage", 0)
    cfg["zero_optimization"] = zero
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
