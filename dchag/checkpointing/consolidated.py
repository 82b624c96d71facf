"""The consolidated export: ``OUT/model.safetensors`` + ``OUT/config.json`` (+ manifest).

- ``model.safetensors``: every parameter whole, fp32, by its canonical name (the name in the
  serial, T = P = 1 model's ``named_parameters()``); safetensors, so no pickle is needed to read it.
- ``config.json``: ``model`` (the DChagConfig fields: sizes, G, aggregation, tree levels, task;
  for a blend of data sources ``sources``, per source its channels' ids in the union, and
  ``source_names``),
  ``channel_names`` and ``wavelengths`` (when known), ``normalization`` (statistics training
  applied), ``iteration``, ``consumed_samples``, ``lr_scheduler``, ``training_args``,
  ``source`` (the layout it came from), ``parameters`` (each parameter's shard kind, for
  converting back to any layout), ``versions``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import tempfile

import torch

from dchag.checkpointing import durable, manifest, sizes
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.write_errors import cause_of, os_code

WEIGHTS, CONFIG = "model.safetensors", "config.json"
FORMAT = "dchag-consolidated"
DTYPE = "float32"  # every export's tensors (config.json "dtype"; exports without the key are float32 too)
_SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64"}


def config_to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    d.pop("extra", None)
    for key in ("out_channels", "channel_names", "wavelengths", "source_names"):
        if d.get(key) is not None:
            d[key] = list(d[key])
    if d.get("sources") is not None:  # a blend: per source its union channel ids
        d["sources"] = [list(ids) for ids in d["sources"]]
    return d


def config_from_dict(d: dict, **overrides):
    from dchag.model.config import DChagConfig
    names = {f.name for f in dataclasses.fields(DChagConfig)} - {"extra"}
    kw = {k: v for k, v in d.items() if k in names}
    for key in ("out_channels", "lora_targets"):
        if kw.get(key) is not None:
            kw[key] = tuple(kw[key])
    kw.update(overrides)
    return DChagConfig(**kw)


def versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("dchag", "torch", "deepspeed", "megatron-core", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def check_output(save_dir: str) -> None:
    """An existing non-empty ``save_dir`` is refused, never overwritten."""
    if os.path.exists(save_dir) and (not os.path.isdir(save_dir) or os.listdir(save_dir)):
        raise CheckpointError(f"--save-dir {save_dir} already exists and is not empty; choose a new folder (nothing "
                              "was written).")


def _readable(folder: str) -> None:
    """Every file 0644 under the usual umask, as training writes them (safetensors creates 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    for root, _, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


@contextlib.contextmanager
def staged_output(save_dir: str):
    """Write a new output folder atomically: yields a fresh sibling temp folder; on success it
    becomes ``save_dir`` (which must not exist or be empty), on an error it is removed, so a
    failed conversion leaves nothing half-written and overwrites nothing."""
    check_output(save_dir)
    parent = os.path.dirname(os.path.abspath(save_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(os.path.abspath(save_dir)) + "-", dir=parent)
    try:
        yield tmp
        _readable(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        durable.fsync_tree(tmp)  # what the converter and the export wrote, on disk before it is published
        if os.path.isdir(save_dir):
            os.rmdir(save_dir)  # empty (checked above)
        os.replace(tmp, save_dir)
        durable.fsync_dir(parent)
    except BaseException as e:
        failed_os = isinstance(e, Exception) and not isinstance(e, CheckpointError) and os_code(e, tmp) is not None
        cause = cause_of(e, tmp) if failed_os else None  # before the partial files go
        shutil.rmtree(tmp, ignore_errors=True)
        if cause:
            raise CheckpointError(f"cannot write {save_dir}: {cause}; nothing was written (the partial output was "
                                  "removed).") from e
        raise


def write(save_dir: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    from safetensors.torch import save_file
    with staged_output(save_dir) as tmp:
        save_file({k: v.detach().to(torch.float32).contiguous().clone() for k, v in sorted(tensors.items())},
                  os.path.join(tmp, WEIGHTS), metadata={"format": "pt", "producer": FORMAT})
        with open(os.path.join(tmp, CONFIG), "w") as f:
            json.dump({"format": FORMAT, "version": 1, "dtype": DTYPE, **config}, f, indent=1)
            f.write("\n")
        manifest.write_manifest(tmp)
    return save_dir


def is_consolidated(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(path, WEIGHTS))


def read_config(path: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG)) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {os.path.join(path, CONFIG)} ({e}); is {path} a consolidated export "
                              "(tools/convert_checkpoint.py --format consolidated)?") from e
    if config.get("format") != FORMAT:
        raise CheckpointError(f"{os.path.join(path, CONFIG)} is not a dchag consolidated export.")
    return config


# A model whose config claims less than this is built for real, on the CPU, to read its shapes.
SMALL_MODEL_BYTES = 256 * 2**20


def rough_nbytes(model: dict) -> int:
    """The fp32 bytes of the model a config's ``model`` describes, within a small factor (the
    backbone's matrices, the per-channel tokenizer and head rows, the position embedding)."""
    try:
        D, L, C, p = (int(model[k]) for k in ("hidden_size", "num_layers", "num_channels", "patch_dim"))
        F = int(model.get("ffn_hidden_size") or 4 * D)
        tokens = (int(model["img_h"]) // max(p, 1)) * (int(model["img_w"]) // max(p, 1))
    except (KeyError, TypeError, ValueError):  # not a model description: the meta build says what is wrong
        return SMALL_MODEL_BYTES
    return 4 * (L * (4 * D * D + 2 * D * F) + 2 * C * (p * p + 2) * D + tokens * D)


def model_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """{name: shape} of the serial model a config's ``model`` describes. A config claiming a large
    model is built on the ``meta`` device: shapes only, nothing allocated, so it costs nothing. A
    small one is built for real on the CPU (milliseconds): on ``meta``, torch runs the model's
    initialization through its Python reference ops, whose first call imports torch._dynamo and
    torch._inductor, about a second of ``dchag.load_pretrained``'s time (tests/test_startup.py)."""
    from dchag.inference.runtime import build_serial_model
    cfg = config_from_dict(model, bf16=False, sequence_parallel=False, recompute_activations=False)
    device = "cpu" if rough_nbytes(model) < SMALL_MODEL_BYTES else "meta"
    with torch.random.fork_rng(devices=[]), torch.device(device):  # the caller's random state untouched
        return {n: tuple(p.shape) for n, p in build_serial_model(cfg).named_parameters()}


def has_manifest(path: str) -> bool:
    return manifest.read_manifest(path) is not None


def verify_command(path: str) -> str:
    return f"python tools/convert_checkpoint.py --load-dir {path} --verify"


def dtype_problems(path: str, config: dict) -> list[str]:
    """Tensors of the export stored in another dtype than its config.json says (from the header)."""
    want = str(config.get("dtype") or DTYPE)
    code = _SAFETENSORS_DTYPE.get(want)
    if code is None:
        return [f"{os.path.join(path, CONFIG)} gives dtype {want!r}; an export is {DTYPE}"]
    odd = {n: d for n, d in sizes.header_dtypes(os.path.join(path, WEIGHTS)).items() if d != code}
    if not odd:
        return []
    named = ", ".join(f"{n} ({d})" for n, d in sorted(odd.items())[:5])
    return [f"{len(odd)} tensor(s) of {os.path.join(path, WEIGHTS)} are not {want} ({code}) as {CONFIG} says: "
            f"{named}{' ...' if len(odd) > 5 else ''}"]


def finite_problems(path: str, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Tensors holding a NaN or an infinity (a trained model holds none)."""
    bad = {}
    for name, t in tensors.items():
        if t.is_floating_point():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[name] = n
    if not bad:
        return []
    named = ", ".join(f"{n} ({k} of {tensors[n].numel()})" for n, k in sorted(bad.items())[:5])
    return [f"{len(bad)} tensor(s) of {os.path.join(path, WEIGHTS)} hold NaN or infinite values: "
            f"{named}{' ...' if len(bad) > 5 else ''}"]


def _refuse(path: str, problems: list[str], manifested: bool) -> None:
    if problems:
        why = ("" if manifested else f" It has no {manifest.MANIFEST}, so it cannot be checked against what was "
                                     "exported.")
        raise CheckpointError(f"export {path} is damaged: {'; '.join(problems)}; nothing was loaded.{why} Export it "
                              "again from the training checkpoint (tools/convert_checkpoint.py --format consolidated).")


def refuse_non_finite(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """For a caller that read the export's tensors itself (slices): refuse NaN or infinite values."""
    _refuse(path, finite_problems(path, tensors), has_manifest(path))


def warn_without_manifest(path: str) -> None:
    print(f"warning: {path} has no {manifest.MANIFEST}, so a changed byte in it cannot be detected (its dtypes, shapes "
          f"and values were checked). Exports written by tools/convert_checkpoint.py have one; check this one with: "
          f"{verify_command(path)}", file=sys.stderr, flush=True)


def read(path: str, verify: bool = True, check_model: bool = True, load: bool = True
         ) -> tuple[dict[str, torch.Tensor] | None, dict]:
    """(tensors, config). Before reading a tensor: the manifest (a damaged file is refused by
    name; a missing one is a warning); the safetensors header against the parameter table of
    config.json, its dtypes against config.json's, and (``check_model``) its shapes against the
    model config.json describes; the memory the tensors and that model need. After: every value
    finite. Whether or not a manifest vouches for the files, a tampered export is refused.
    ``load=False``: the checks only, tensors None (a caller that reads slices of them checks their
    values with :func:`refuse_non_finite`)."""
    from safetensors.torch import load_file
    if not is_consolidated(path):
        raise CheckpointError(f"{path} holds no {CONFIG} + {WEIGHTS}; export one with tools/convert_checkpoint.py "
                              "--format consolidated.")
    manifested = has_manifest(path)
    if verify and manifested:
        manifest.raise_problems(path, manifest.verify(path, require=False),
                                "Export it again from the training checkpoint.")
    config = read_config(path)
    weights, config_path = os.path.join(path, WEIGHTS), os.path.join(path, CONFIG)
    held = sizes.header_shapes(weights)
    declared = {n: tuple(spec["shape"]) for n, spec in (config.get("parameters") or {}).items()}
    if declared:
        sizes.compare(declared, held, f"the parameter table of {config_path}", f"the tensors of {weights}")
    _refuse(path, dtype_problems(path, config), manifested)
    need = os.path.getsize(weights) if load else 0
    if check_model:
        if not isinstance(config.get("model"), dict):
            raise CheckpointError(f"{config_path} has no model description; export it again.")
        try:
            implied = model_shapes(config["model"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{config_path} describes no buildable model ({e}); export it again.") from e
        sizes.compare(implied, held, f"the model {config_path} describes ({sizes.config_summary(config['model'])})",
                      f"the tensors it declares ({weights})")
        need += sizes.nbytes(implied)
    sizes.check_memory(need, f"loading {path}")
    if not load:
        if verify and not manifested:
            warn_without_manifest(path)
        return None, config
    try:
        tensors = load_file(weights)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {weights} ({e}); the file is damaged.") from e
    _refuse(path, finite_problems(path, tensors), manifested)
    if verify and not manifested:
        warn_without_manifest(path)
    return tensors, config


def content_problems(path: str) -> list[str]:
    """``--verify`` of an export beyond its manifest: dtypes against config.json, every value finite."""
    from safetensors.torch import load_file
    config = read_config(path)
    problems = dtype_problems(path, config)
    if not problems:
        sizes.check_memory(os.path.getsize(os.path.join(path, WEIGHTS)), f"checking {path}")
        try:
            problems = finite_problems(path, load_file(os.path.join(path, WEIGHTS)))
        except Exception as e:  # noqa: BLE001
            problems = [f"cannot read {os.path.join(path, WEIGHTS)} ({e}); the file is damaged"]
    return problems
