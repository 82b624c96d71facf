"""The DeepSpeed JSON, filled from the command line (one source of truth; conflicts are errors).

Batch size, precision and gradient clipping may be given on the command line, in the JSON, or
both. Given in one place, that value is used (and written into the other: ``args`` and the
config DeepSpeed receives agree); given in both, they must agree or training does not start.
Given nowhere: micro-batch 1, global batch = micro-batch x data-parallel size, fp32, clip 1.0.
"""

from __future__ import annotations

import json

AUTO = "auto"


class ConfigError(ValueError):
    """A DeepSpeed JSON value conflicts with the command line (or is unusable)."""


def _given(cfg: dict, key: str) -> bool:
    return key in cfg and cfg[key] is not None and cfg[key] != AUTO


def _conflict(path: str, key: str, json_value, flag: str, cli_value) -> ConfigError:
    given = f"{flag} {cli_value}".strip()
    return ConfigError(f"DeepSpeed config {path} sets {key}={json_value!r} but the command line gives {given}; "
                       "remove one of them or make them agree.")


def _resolve(cfg: dict, key: str, cli_value, flag: str, path: str, cast=int, label: str | None = None):
    """The value both agree on (None if neither gives it); raises on a conflict."""
    if cli_value is None:
        return cast(cfg[key]) if _given(cfg, key) else None
    if _given(cfg, key) and cast(cfg[key]) != cast(cli_value):
        raise _conflict(path, label or key, cfg[key], flag, "" if cast is bool else cli_value)
    return cast(cli_value)


def load_json(path: str | None) -> dict:
    if not path:
        return {}
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read --deepspeed_config {path}: {e.strerror}.") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"--deepspeed_config {path} is not valid JSON: {e}.") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"--deepspeed_config {path} must hold a JSON object.")
    return cfg


def build_ds_config(args, data_parallel_size: int) -> dict:
    """The config handed to ``deepspeed.initialize``. Fills ``args.micro_batch_size``,
    ``args.global_batch_size``, ``args.bf16`` and ``args.clip_grad`` with the resolved values."""
    path = args.deepspeed_config or "<no --deepspeed_config>"
    cfg = load_json(args.deepspeed_config)
    from dchag.training.ds_validate import validate
    validate(cfg, path)  # unknown keys and invalid sections, one line each
    dp = int(data_parallel_size)

    for section, what in (("optimizer", "AdamW from --lr/--weight-decay/--adam-*"),
                          ("scheduler", "warmup + decay from --lr-warmup-iters/--lr-decay-style")):
        if cfg.get(section):
            raise ConfigError(f"DeepSpeed config {path} has an '{section}' section, but pretrain_dchag.py builds "
                              f"its own ({what}); remove the section from the JSON.")
    if cfg.get("fp16", {}).get("enabled") not in (None, False, AUTO):
        raise ConfigError(f"DeepSpeed config {path} enables fp16: use bf16 (--bf16 or bf16.enabled); "
                          "fp16 loss scaling is not supported.")

    # Batch sizes: train_batch_size = micro x accumulation x DP.
    mbs = _resolve(cfg, "train_micro_batch_size_per_gpu", args.micro_batch_size, "--micro-batch-size", path)
    gbs = _resolve(cfg, "train_batch_size", args.global_batch_size, "--global-batch-size", path)
    gas = int(cfg["gradient_accumulation_steps"]) if _given(cfg, "gradient_accumulation_steps") else None
    mbs = mbs if mbs is not None else 1
    if gbs is None:
        gbs = mbs * dp * (gas or 1)
    for flag, v in (("--micro-batch-size", mbs), ("--global-batch-size", gbs)):
        if v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}.")
    if gbs % (mbs * dp):
        raise ConfigError(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs} x "
                          f"data-parallel size {dp}; choose a multiple of {mbs * dp}.")
    if gas is not None and gas != gbs // (mbs * dp):
        raise _conflict(path, "gradient_accumulation_steps", gas, "--global-batch-size / (--micro-batch-size x DP):",
                        f"{gbs} / ({mbs} x {dp}) = {gbs // (mbs * dp)}")
    cfg["train_micro_batch_size_per_gpu"] = mbs
    cfg["train_batch_size"] = gbs
    cfg["gradient_accumulation_steps"] = gbs // (mbs * dp)
    args.micro_batch_size, args.global_batch_size = mbs, gbs

    # Gradient clipping.
    clip = _resolve(cfg, "gradient_clipping", args.clip_grad, "--clip-grad", path, cast=float)
    cfg["gradient_clipping"] = args.clip_grad = 1.0 if clip is None else clip

    # Precision.
    bf16 = dict(cfg.get("bf16") or {})
    enabled = _resolve(bf16, "enabled", args.bf16, "--bf16", path, cast=bool, label="bf16.enabled")
    bf16["enabled"] = args.bf16 = bool(enabled)
    cfg["bf16"] = bf16

    zero = dict(cfg.get("zero_optimization") or {})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero['stage']!r}.")
    cfg["zero_optimization"] = zero
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    return cfg
