"""The DeepSpeed JSON, filled from the command line (one source of truth; conflicts are errors).

Batch size, precision and gradient clipping may be given on the command line, in the JSON, or
both. Given in one place, that value is used (and written into the other: ``args`` and the
config DeepSpeed receives agree); given in both, they must agree or training does not start.
Given nowhere: micro-batch 1, global batch = micro-batch x data-parallel size, fp32, clip 1.0.
Every problem is reported at once (one ``ConfigError``, one line each). Imports nothing of
DeepSpeed (the pre-flight runs it before any process group exists).
"""

from __future__ import annotations

import json

from dchag.training.ds_validate import ConfigError, key_problems

__all__ = ["AUTO", "ConfigError", "build_ds_config", "load_json"]

AUTO = "auto"


def _given(cfg: dict, key: str) -> bool:
    return key in cfg and cfg[key] is not None and cfg[key] != AUTO


def _conflict(path: str, key: str, json_value, flag: str, cli_value) -> str:
    given = f"{flag} {cli_value}".strip()
    return (f"DeepSpeed config {path} sets {key}={json_value!r} but the command line gives {given}; "
            "remove one of them or make them agree.")


def _resolve(cfg: dict, key: str, cli_value, flag: str, path: str, problems: list, cast=int, label: str | None = None):
    """The value both agree on (None if neither gives it); a conflict is added to ``problems``
    (and the command line's value used, so the other checks can go on)."""
    if cli_value is None:
        if not _given(cfg, key):
            return None
        try:
            return cast(cfg[key])
        except (TypeError, ValueError):
            problems.append(f"DeepSpeed config {path}: {label or key} = {cfg[key]!r} is not a "
                            f"{cast.__name__}.")
            return None
    try:
        if _given(cfg, key) and cast(cfg[key]) != cast(cli_value):
            problems.append(_conflict(path, label or key, cfg[key], flag, "" if cast is bool else cli_value))
    except (TypeError, ValueError):
        problems.append(f"DeepSpeed config {path}: {label or key} = {cfg[key]!r} is not a {cast.__name__}.")
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
    ``args.global_batch_size``, ``args.bf16`` and ``args.clip_grad`` with the resolved values.
    Raises one ``ConfigError`` listing every problem (unknown keys included; the section values
    are checked against DeepSpeed's own models by ``ds_validate.value_problems``)."""
    path = args.deepspeed_config or "<no --deepspeed_config>"
    cfg = load_json(args.deepspeed_config)
    problems = key_problems(cfg, path)  # unknown keys, top-level and nested
    dp = int(data_parallel_size)

    for section, what in (("optimizer", "AdamW from --lr/--weight-decay/--adam-*"),
                          ("scheduler", "warmup + decay from --lr-warmup-iters/--lr-decay-style")):
        if cfg.get(section):
            problems.append(f"DeepSpeed config {path} has an '{section}' section, but pretrain_dchag.py builds "
                            f"its own ({what}); remove the section from the JSON.")
    fp16 = cfg.get("fp16")
    if isinstance(fp16, dict) and fp16.get("enabled") not in (None, False, AUTO):
        problems.append(f"DeepSpeed config {path} enables fp16: use bf16 (--bf16 or bf16.enabled); "
                        "fp16 loss scaling is not supported.")

    # Batch sizes: train_batch_size = micro x accumulation x DP.
    mbs = _resolve(cfg, "train_micro_batch_size_per_gpu", args.micro_batch_size, "--micro-batch-size", path, problems)
    gbs = _resolve(cfg, "train_batch_size", args.global_batch_size, "--global-batch-size", path, problems)
    gas = _resolve(cfg, "gradient_accumulation_steps", None, "", path, problems)
    mbs = mbs if mbs is not None else 1
    if gbs is None:
        gbs = mbs * dp * (gas or 1)
    bad = [f"{flag} must be >= 1, got {v}." for flag, v in (("--micro-batch-size", mbs), ("--global-batch-size", gbs))
           if v < 1]
    problems += bad
    if not bad:
        if gbs % (mbs * dp):
            problems.append(f"--global-batch-size {gbs} is not a multiple of --micro-batch-size {mbs} x "
                            f"data-parallel size {dp}; choose a multiple of {mbs * dp}.")
        elif gas is not None and gas != gbs // (mbs * dp):
            problems.append(_conflict(path, "gradient_accumulation_steps", gas,
                                      "--global-batch-size / (--micro-batch-size x DP):",
                                      f"{gbs} / ({mbs} x {dp}) = {gbs // (mbs * dp)}"))
    cfg["train_micro_batch_size_per_gpu"] = mbs
    cfg["train_batch_size"] = gbs
    cfg["gradient_accumulation_steps"] = max(gbs // max(mbs * dp, 1), 1)
    args.micro_batch_size, args.global_batch_size = mbs, gbs

    # Gradient clipping.
    clip = _resolve(cfg, "gradient_clipping", args.clip_grad, "--clip-grad", path, problems, cast=float)
    cfg["gradient_clipping"] = args.clip_grad = 1.0 if clip is None else clip

    # Precision.
    bf16 = dict(cfg.get("bf16") or {}) if isinstance(cfg.get("bf16", {}), dict) else {}
    enabled = _resolve(bf16, "enabled", args.bf16, "--bf16", path, problems, cast=bool, label="bf16.enabled")
    bf16["enabled"] = args.bf16 = bool(enabled)
    cfg["bf16"] = bf16

    zero = dict(cfg.get("zero_optimization") or {})
    if args.zero_stage is not None:
        zero["stage"] = args.zero_stage
    zero.setdefault("stage", 0)
    if zero["stage"] not in (0, 1, 2, 3):
        problems.append(f"zero_optimization.stage must be 0, 1, 2 or 3, got {zero['stage']!r} (--zero-stage or "
                        f"the JSON {path}).")
    cfg["zero_optimization"] = zero
    cfg.setdefault("steps_per_print", 10**9)
    cfg.setdefault("wall_clock_breakdown", False)
    if problems:
        raise ConfigError(problems)
    return cfg
