"""The DeepSpeed JSON checked before anything is built.

DeepSpeed ignores a top-level key it does not know (``"zero_optimisation"`` trains at ZeRO stage 0
without a word), and a bad nested key gives a long pydantic traceback from every rank. Here:

- an unknown top-level key is refused, naming the key and the nearest valid one (difflib);
- each section DeepSpeed parses with a pydantic model is validated with that model, and the
  first error is reduced to one line naming the key path (``zero_optimization.stgae``), the
  problem and, for an unknown key, the nearest valid one.

``TOP_LEVEL_KEYS`` lists the keys DeepSpeed 0.19.8 reads (``DeepSpeedConfig`` and the engine);
tests/test_operations.py checks that each occurs in DeepSpeed's source.
"""

from __future__ import annotations

import difflib
import importlib

from dchag.training.ds_config import ConfigError

TOP_LEVEL_KEYS = frozenset((
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "steps_per_print",
    "dump_state", "disable_allgather", "communication_data_type", "seq_parallel_communication_data_type",
    "prescale_gradients", "gradient_predivide_factor", "gradient_allreduce_op", "sparse_gradients",
    "gradient_clipping", "graph_harvesting", "managed_gradient_accumulation", "wall_clock_breakdown",
    "memory_breakdown", "log_level", "timers", "disable_python_gc", "dataloader_drop_last",
    "optimizer", "scheduler", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer",
    "fp16", "bf16", "bfloat16", "amp", "torch_autocast", "data_types", "checkpoint", "datastates_ckpt",
    "activation_checkpointing", "flops_profiler", "aio", "autotuning", "model_info", "elasticity",
    "tensorboard", "wandb", "csv_monitor", "comet", "comms_logger", "compile", "compression_training",
    "curriculum_learning", "data_efficiency", "eigenvalue", "progressive_layer_drop", "quantize_training",
    "weight_quantization", "sparse_attention", "pipeline", "hybrid_engine", "tensor_parallel", "expert_parallel",
    "use_data_before_expert_parallelism", "nebula", "vocabulary_size", "sequence_parallel_size",
))

# Sections DeepSpeed validates with a pydantic model: key -> "module:Class".
SECTION_MODELS = {
    "zero_optimization": "deepspeed.runtime.zero.config:DeepSpeedZeroConfig",
    "bf16": "deepspeed.runtime.precision_config:DeepSpeedBF16Config",
    "fp16": "deepspeed.runtime.precision_config:DeepSpeedFP16Config",
    "tensorboard": "deepspeed.monitor.config:TensorBoardConfig",
    "wandb": "deepspeed.monitor.config:WandbConfig",
    "csv_monitor": "deepspeed.monitor.config:CSVConfig",
    "comet": "deepspeed.monitor.config:CometConfig",
    "comms_logger": "deepspeed.comm.config:CommsLoggerConfig",
    "compile": "deepspeed.compile.config:CompileConfig",
}


def _nearest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _model(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _field_names(model) -> set[str]:
    names = set()
    for name, field in model.model_fields.items():
        names.add(name)
        if field.alias:
            names.add(field.alias)
    return names


def _submodel(model, loc):
    """The pydantic model holding the field at ``loc`` (for the nearest-key hint)."""
    for part in loc:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            field = next((f for f in model.model_fields.values() if f.alias == part), None)
        ann = getattr(field, "annotation", None)
        candidates = [ann] + list(getattr(ann, "__args__", ()) or ())
        sub = next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)
        if sub is None:
            return model
        model = sub
    return model


def validate(cfg: dict, path: str) -> None:
    """Raise ``ConfigError`` (one line) for an unknown top-level key or an invalid section."""
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        k = unknown[0]
        raise ConfigError(f"DeepSpeed config {path}: unknown top-level key '{k}'{_nearest(k, TOP_LEVEL_KEYS)} "
                          "(DeepSpeed would ignore it silently); fix or remove it.")
    import pydantic
    for section, spec in SECTION_MODELS.items():
        value = cfg.get(section)
        if not isinstance(value, dict):
            continue
        model = _model(spec)
        try:
            model(**value)
        except pydantic.ValidationError as e:
            err = e.errors()[0]
            loc = tuple(err.get("loc", ()))
            where = ".".join([section] + [str(p) for p in loc])
            if err.get("type") == "extra_forbidden":
                hint = _nearest(loc[-1], _field_names(_submodel(model, loc[:-1]))) if loc else ""
                raise ConfigError(f"DeepSpeed config {path}: unknown key {where}{hint}; fix or remove it.") from None
            raise ConfigError(f"DeepSpeed config {path}: {where} = {err.get('input')!r}: {err.get('msg')}.") from None
        except (TypeError, ValueError) as e:  # a model's own validator raising plainly
            raise ConfigError(f"DeepSpeed config {path}: section '{section}' is invalid: "
                              f"{str(e).splitlines()[0]}.") from None
