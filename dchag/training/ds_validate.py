"""The DeepSpeed JSON checked before anything is built, every problem at once.

DeepSpeed ignores a top-level key it does not know (``"zero_optimisation"`` trains at ZeRO stage 0
without a word), and a bad nested key gives a long pydantic traceback from every rank, one typo
per run. Here, two passes, each listing every problem it finds (one line each):

- :func:`key_problems`: unknown keys, at the top level and inside every section DeepSpeed
  validates with a pydantic model, each with the nearest valid key (difflib). It imports nothing
  of DeepSpeed: the keys come from :mod:`dchag.training.ds_keys`, a snapshot of DeepSpeed's models
  (``python -m dchag.training.ds_validate --write-keys`` rewrites it; tests/test_startup.py checks
  it against the installed DeepSpeed). The pre-flight runs it, so a typo fails in a second.
- :func:`value_problems`: each section through DeepSpeed's own pydantic model (wrong types and
  values; imports DeepSpeed). The pre-flight runs it last, once every quick check has passed.

``TOP_LEVEL_KEYS`` lists the keys DeepSpeed 0.19.8 reads (``DeepSpeedConfig`` and the engine);
tests/test_operations.py checks that each occurs in DeepSpeed's source.
"""

from __future__ import annotations

import difflib
import importlib
import sys

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


class ConfigError(ValueError):
    """The DeepSpeed JSON (or a value the command line gives it) is unusable; ``problems`` holds one
    line per problem, and the message is those lines."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


def _nearest(key: str, valid) -> str:
    close = difflib.get_close_matches(str(key), sorted(valid), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


def _unknown(where: str, path: str, hint: str) -> str:
    return f"DeepSpeed config {path}: unknown key {where}{hint}; fix or remove it."


def _walk(value: dict, keys: dict, where: str, path: str, out: list[str]) -> None:
    for k, v in value.items():
        if k not in keys:
            out.append(_unknown(f"{where}.{k}", path, _nearest(k, keys)))
        elif isinstance(keys[k], dict) and isinstance(v, dict):
            _walk(v, keys[k], f"{where}.{k}", path, out)


def key_problems(cfg: dict, path: str) -> list[str]:
    """Every unknown key, top-level and nested, one line each (imports nothing of DeepSpeed)."""
    from dchag.training.ds_keys import SECTION_KEYS
    out = []
    for k, v in cfg.items():
        if k not in TOP_LEVEL_KEYS:
            out.append(f"DeepSpeed config {path}: unknown top-level key '{k}'{_nearest(k, TOP_LEVEL_KEYS)} "
                       "(DeepSpeed would ignore it silently); fix or remove it.")
        elif k in SECTION_KEYS and isinstance(v, dict):
            _walk(v, SECTION_KEYS[k], k, path, out)
    return out


def _model(spec: str):
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def _submodel(model, field):
    """The pydantic model a field holds (directly or as ``Optional[...]``), else None."""
    ann = field.annotation
    candidates = [ann] + list(getattr(ann, "__args__", ()) or ())
    return next((c for c in candidates if isinstance(c, type) and hasattr(c, "model_fields")), None)


def _key_tree(model) -> dict:
    """{key: None or the nested model's key tree} for every field name and alias of ``model``."""
    out = {}
    for name, field in model.model_fields.items():
        sub = _submodel(model, field)
        tree = None if sub is None else _key_tree(sub)
        for key in {name, field.alias or name}:
            out[key] = tree
    return out


def section_keys_from_deepspeed() -> dict:
    """The key tree of every section model of the installed DeepSpeed (what ``ds_keys`` snapshots)."""
    return {section: _key_tree(_model(spec)) for section, spec in SECTION_MODELS.items()}


def value_problems(cfg: dict, path: str) -> list[str]:
    """Every error DeepSpeed's pydantic models find in the sections (imports DeepSpeed). Unknown
    keys are left to :func:`key_problems`."""
    import pydantic
    out = []
    for section, spec in SECTION_MODELS.items():
        value = cfg.get(section)
        if not isinstance(value, dict):
            continue
        try:
            _model(spec)(**value)
        except pydantic.ValidationError as e:
            for err in e.errors():
                if err.get("type") == "extra_forbidden":
                    continue
                where = ".".join([section] + [str(p) for p in err.get("loc", ())])
                out.append(f"DeepSpeed config {path}: {where} = {err.get('input')!r}: {err.get('msg')}.")
        except (TypeError, ValueError) as e:  # a model's own validator raising plainly
            out.append(f"DeepSpeed config {path}: section '{section}' is invalid: {str(e).splitlines()[0]}.")
    return out


def validate(cfg: dict, path: str) -> None:
    """Raise one ``ConfigError`` listing every unknown key and invalid section value."""
    problems = key_problems(cfg, path) + value_problems(cfg, path)
    if problems:
        raise ConfigError(problems)


def write_keys(target: str) -> None:
    """Rewrite ``dchag/training/ds_keys.py`` from the installed DeepSpeed."""
    import pprint

    import deepspeed
    text = (f'"""DeepSpeed {deepspeed.__version__}\'s JSON section keys (field names and aliases of its pydantic '
            'models), for\nchecking a JSON without importing DeepSpeed. Generated by '
            '``python -m dchag.training.ds_validate --write-keys``;\ntests/test_startup.py checks it against the '
            'installed DeepSpeed."""\n\n'
            f"DEEPSPEED_VERSION = {deepspeed.__version__!r}\n\n"
            f"SECTION_KEYS = {pprint.pformat(section_keys_from_deepspeed(), width=116, sort_dicts=True)}\n")
    with open(target, "w") as f:
        f.write(text)


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-keys"]:
        sys.exit("usage: python -m dchag.training.ds_validate --write-keys")
    import os
    write_keys(os.path.join(os.path.dirname(os.path.abspath(__file__)), "ds_keys.py"))
