"""The conversions behind ``tools/convert_checkpoint.py``.

    export_consolidated(RUN_OR_ITER, OUT)       DeepSpeed checkpoint (any layout) -> safetensors + config.json
    to_deepspeed(CONSOLIDATED, RUN, T, P)       consolidated -> a DeepSpeed checkpoint for layout (T, P),
                                                weights only: continue with pretrain_dchag.py --load RUN --no-load-optim
    to_universal(RUN_OR_ITER, OUT)              ds_to_universal (weights and optimizer state) + what --load needs
    verify(PATH)                                every file against its manifest

Every reader checks the source's manifest first; every writer refuses an existing non-empty
output folder and writes into a temporary sibling that is renamed only when complete.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import torch

from dchag.checkpointing import consolidated, fingerprint, frozen, manifest, normalization, pickles, reader, shards, sizes
from dchag.checkpointing.errors import CheckpointError
from dchag.checkpointing.tags import is_universal, read_latest, saved_iterations, tag_for  # noqa: F401 - is_universal: re-exported
from dchag.tasks import get_task


def _log(msg: str) -> None:
    print(msg, flush=True)


def config_of_run(ns: argparse.Namespace, norm: dict | None = None):
    """The DChagConfig of a training run from its arguments (``reader.run_args``) and, for checkpoints
    saved before the arguments recorded the channel identity, its normalization.json."""
    from dchag.arguments import model_config
    if getattr(ns, "channel_names", None) is None and norm:  # saved before the arguments recorded the identity
        ns.channel_names, ns.wavelengths = norm.get("channel_names"), norm.get("wavelengths")
    return model_config(ns)


def run_config(folder: str, state: dict | None = None) -> tuple[dict, object]:
    """(the export's config.json without its parameter table, the DChagConfig) of the training
    checkpoint ``folder``: read from its client state (``state``, when already read), its
    arguments and normalization.json, no weights."""
    from dchag.model.lora import spec_of
    state = reader.client_state(folder) if state is None else state
    ns = reader.run_args(folder, state)
    norm = normalization.read(folder)
    cfg = config_of_run(ns, norm)
    T, P = int(ns.tensor_model_parallel_size), int(ns.channel_parallel_size)
    lora = spec_of(cfg)
    config = {
        "model": consolidated.config_to_dict(cfg),
        "task": cfg.task, "aggregation": cfg.aggregation, "groups": cfg.num_groups,
        "channel_names": cfg.channel_names and list(cfg.channel_names),
        "wavelengths": cfg.wavelengths and list(cfg.wavelengths),
        "normalization": norm,
        "iteration": int(state.get("iteration", 0)), "consumed_samples": int(state.get("consumed_samples", 0)),
        "lr_scheduler": state.get("lr_scheduler"),
        **get_task(cfg.task).export_fields(ns, norm),  # mask ratio, lead time, targets: what the task needs
        "training_args": dict(vars(ns)),
        "source": {"path": os.path.abspath(folder), "tensor_model_parallel_size": T, "channel_parallel_size": P,
                   "data_parallel_size": int(state.get("dp_world_size", 1)),
                   "zero_stage": int(((state.get("ds_config") or {}).get("zero_optimization") or {}).get("stage", 0)),
                   "bf16": bool(cfg.bf16), "ds_version": state.get("ds_version"),
                   "frozen_parameters": state.get("frozen_parameters"),
                   "lora": lora and {"rank": lora.rank, "alpha": lora.alpha, "dropout": lora.dropout,
                                     "targets": list(lora.targets), "merged": False}},
    }
    return config, cfg


def export_consolidated(load_dir: str, save_dir: str, merge_adapters: bool = True) -> dict:
    """Merge a training checkpoint into OUT/model.safetensors + OUT/config.json; returns the config.
    A LoRA run's adapters are merged into the weights (W + alpha/r B A: a plain model); with
    ``merge_adapters=False`` they are kept apart as tensors (the layout conversion does, to continue
    the LoRA run)."""
    consolidated.check_output(save_dir)  # refuse early, before the work
    tensors, config = consolidate(load_dir, merge_adapters)
    consolidated.write(save_dir, tensors, config)
    lora = config["source"].get("lora")
    _log(f"> wrote {save_dir}/{consolidated.WEIGHTS} ({len(tensors)} tensors, "
         f"{sum(t.numel() for t in tensors.values()):,} parameters) and {consolidated.CONFIG} "
         f"(iteration {config['iteration']}, from T={config['source']['tensor_model_parallel_size']}, "
         f"P={config['source']['channel_parallel_size']})"
         + (f"; LoRA adapters ({lora['rank']}, alpha {lora['alpha']:g}) "
            f"{'merged into the weights' if lora['merged'] else 'kept as tensors'}" if lora else ""))
    return config


def consolidate(load_dir: str, merge_adapters: bool = True) -> tuple[dict, dict]:
    """(every parameter whole, fp32; the export's config.json) of a training checkpoint."""
    from dchag.inference.runtime import build_serial_model
    from dchag.model.lora import merge, spec_of
    folder = reader.resolve_folder(load_dir)
    if not reader.check_integrity(folder):
        _log(f"warning: {folder} has no manifest (saved by an older version); its files are not checksummed.")
    state = reader.client_state(folder)
    config, cfg = run_config(folder, state)
    serial = dataclasses.replace(cfg, bf16=False, sequence_parallel=False, recompute_activations=False)
    with torch.device("meta"):  # shapes only: the arguments may claim any size
        specs = shards.param_specs(build_serial_model(serial))
    # the merged fp32 tensors, and one model-parallel rank's shards while they are merged
    sizes.check_memory(2 * sizes.nbytes({n: spec["shape"] for n, spec in specs.items()}),
                       f"converting {folder} (a model of {sizes.config_summary(config['training_args'])})")
    tensors, _ = reader.read_full_state_dict(folder, list(specs))
    for name, spec in specs.items():
        if list(tensors[name].shape) != spec["shape"]:
            raise CheckpointError(f"{folder}: merged {name} has shape {list(tensors[name].shape)}, the model "
                                  f"{spec['shape']}.")
    lora = spec_of(cfg)
    if lora is not None and merge_adapters:
        tensors = merge(tensors, lora)
        specs = {n: spec for n, spec in specs.items() if n in tensors}
        cfg = dataclasses.replace(cfg, lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_targets=None)
        config["model"] = consolidated.config_to_dict(cfg)
        config["source"]["lora"]["merged"] = True
    config.update(parameters=specs, dtype=consolidated.DTYPE, versions=consolidated.versions())
    return tensors, config


def _universal_info(maps: dict) -> dict:
    from deepspeed.checkpoint import constants as C
    return {C.UNIVERSAL_CHECKPOINT_VERSION_KEY: C.UNIVERSAL_CHECKPOINT_VERSION_VALUE,
            C.AFFINE_MAP: {C.AFFINE_MAP_VERSION: 1, C.AFFINE_MAP_PARAMS: {
                "^" + re.escape(name) + "$": amap.to_dict() for name, amap in maps.items()}}}


ACCEPT_NO_MANIFEST = "--accept-export-without-manifest"


def to_deepspeed(load_dir: str, save_dir: str, tensor_parallel_size: int, channel_parallel_size: int,
                 accept_without_manifest: bool = False) -> str:
    """Cut a consolidated export into a DeepSpeed checkpoint for layout (T, P): per
    model-parallel rank a model-states file holding its shards (fp32) and the client state
    (iteration, consumed samples, LR schedule, arguments with the new layout, affine maps), no
    optimizer state. Returns the checkpoint folder. An export without its manifest is refused
    (the new checkpoint's manifest would vouch for files nobody checked) unless
    ``accept_without_manifest`` (the tool's ``--accept-export-without-manifest``)."""
    import tempfile
    from dchag.arguments import MODEL_ARGS
    T, P = int(tensor_parallel_size), int(channel_parallel_size)
    if not consolidated.is_consolidated(load_dir):  # a training checkpoint: consolidate it first
        consolidated.check_output(save_dir)
        with tempfile.TemporaryDirectory(prefix="dchag_consolidated_") as tmp:
            export_consolidated(load_dir, os.path.join(tmp, "c"), merge_adapters=False)  # a LoRA run continues
            return to_deepspeed(os.path.join(tmp, "c"), save_dir, T, P, accept_without_manifest)
    if not accept_without_manifest and not consolidated.has_manifest(load_dir):
        raise CheckpointError(
            f"{load_dir} has no {manifest.MANIFEST}, so whether its files are the ones exported cannot be checked, and "
            f"--format deepspeed would turn them into a training checkpoint with a manifest of its own. Export it again "
            f"from the training checkpoint (tools/convert_checkpoint.py --format consolidated); if you know where this "
            f"copy came from, add {ACCEPT_NO_MANIFEST} (its dtypes, shapes and values are still checked). Nothing was "
            f"written.")
    tensors, config = consolidated.read(load_dir)  # its sizes checked before anything is allocated
    import deepspeed
    cfg = consolidated.config_from_dict(config["model"])
    from dchag.parallel.partition import LayoutError
    try:  # layout errors before anything is written
        maps = shards.target_maps(config["parameters"], cfg, T, P)
    except LayoutError as e:
        raise CheckpointError(f"--target-tensor-parallel-size {T} --target-channel-parallel-size {P} does not fit "
                              f"this model: {e}") from e
    missing = sorted(set(maps) - set(tensors))
    if missing:
        raise CheckpointError(f"{load_dir}/{consolidated.WEIGHTS} lacks {len(missing)} parameter(s), "
                              f"e.g. {missing[:3]}.")
    with consolidated.staged_output(save_dir) as tmp:
        args = dict(config.get("training_args") or {})
        args.update(tensor_model_parallel_size=T, channel_parallel_size=P)
        margs = {k: args.get(k) for k in MODEL_ARGS}
        iteration, consumed = int(config["iteration"]), int(config["consumed_samples"])
        tag = tag_for(iteration)
        folder = os.path.join(tmp, tag)
        os.makedirs(folder)
        info = _universal_info(maps)
        for r in range(T):
            module = {name: amap.extract(tensors[name], r).clone() for name, amap in maps.items()}
            state = {"module": module, "optimizer": None, "lr_scheduler": config.get("lr_scheduler"),
                     "dp_world_size": 1, "mp_world_size": T, "global_steps": iteration, "global_samples": consumed,
                     "skipped_steps": 0, "ds_version": deepspeed.__version__, "iteration": iteration,
                     "consumed_samples": consumed, "args": margs, "all_args": args,
                     "universal_checkpoint_info": info, "converted_from": os.path.abspath(load_dir)}
            torch.save(state, os.path.join(folder, f"mp_rank_{r:02d}_model_states.pt"))
        with open(os.path.join(folder, "dchag_args.json"), "w") as f:
            json.dump(margs, f, indent=1)
        if config.get("normalization"):
            normalization.write(folder, config["normalization"])
        manifest.write_manifest(folder)
        with open(os.path.join(tmp, "latest"), "w") as f:
            f.write(tag)
    _log(f"> wrote {save_dir}/{tag} for --tensor-model-parallel-size {T} --channel-parallel-size {P} (weights only; "
         f"iteration {iteration}, consumed samples {consumed}). Continue with: pretrain_dchag.py --load {save_dir} "
         f"--no-load-optim --tensor-model-parallel-size {T} --channel-parallel-size {P} ...")
    return os.path.join(save_dir, tag)


def to_universal(load_dir: str, save_dir: str, workers: int = 1) -> str:
    """DeepSpeed's ds_to_universal (weights and optimizer state, merged per parameter) into
    ``save_dir/iter_NNNNNNN`` + ``latest_universal`` + a manifest. ``--load save_dir`` picks it up
    as a universal checkpoint by itself (no JSON edit) on any layout."""
    folder = reader.resolve_folder(load_dir)
    if not reader.check_integrity(folder):
        _log(f"warning: {folder} has no manifest (saved by an older version); its files are not checksummed.")
    pickles.vet(folder)  # ds_to_universal loads with weights_only=False
    if not glob.glob(os.path.join(folder, "*optim_states.pt")):
        raise CheckpointError(f"{folder} was saved without ZeRO (stage 0): DeepSpeed's universal format needs ZeRO "
                              "optimizer shards. Use --format consolidated, then --format deepspeed for the new "
                              "layout (weights only, continue with --no-load-optim).")
    tag = os.path.basename(os.path.normpath(folder))
    with consolidated.staged_output(save_dir) as tmp:
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", folder,
               "--output_folder", os.path.join(tmp, tag), "--num_extract_workers", str(workers),
               "--num_merge_workers", str(workers)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"ds_to_universal failed on {folder}:\n{(proc.stdout + proc.stderr)[-3000:]}")
        for name in ("dchag_args.json", normalization.FILE, fingerprint.FILE):
            if os.path.exists(os.path.join(folder, name)):
                shutil.copy2(os.path.join(folder, name), os.path.join(tmp, tag, name))
        kept = frozen.add_to_universal(folder, os.path.join(tmp, tag), _parameter_names(folder))
        if kept:
            _log(f"> {len(kept)} frozen parameter(s) written whole (ds_to_universal keeps only model-parallel rank "
                 f"0's shard of what the optimizer does not hold), e.g. {', '.join(kept[:3])}")
        manifest.write_manifest(os.path.join(tmp, tag))
        with open(os.path.join(tmp, "latest_universal"), "w") as f:
            f.write(tag)
    _log(f"> wrote universal checkpoint {save_dir}/{tag}. Continue on any layout with: pretrain_dchag.py --load "
         f"{save_dir} --tensor-model-parallel-size T --channel-parallel-size P ...")
    return os.path.join(save_dir, tag)


def _parameter_names(folder: str) -> list[str]:
    """Every parameter of the run that saved ``folder`` (its affine maps)."""
    from deepspeed.checkpoint import constants as C
    state = reader.client_state(folder)
    maps = ((state.get("universal_checkpoint_info") or {}).get(C.AFFINE_MAP) or {}).get(C.AFFINE_MAP_PARAMS) or {}
    return [reader.param_name(pattern) for pattern in maps]


def verify(path: str) -> list[tuple[str, list[str]]]:
    """[(folder, problems)] for a checkpoint folder, a consolidated export, or every checkpoint
    of a run folder. A folder without a manifest is a problem."""
    if os.path.isfile(os.path.join(path, manifest.MANIFEST)) or consolidated.is_consolidated(path) or \
            glob.glob(os.path.join(path, "*model_states.pt")):
        folders = [path]
    else:
        its = saved_iterations(path)
        if not its:
            raise CheckpointError(f"{path} is neither a checkpoint, a consolidated export nor a run folder with "
                                  "iter_NNNNNNN checkpoints.")
        folders = [os.path.join(path, tag_for(i)) for i in its]
    out = []
    for folder in folders:
        try:
            problems = manifest.verify(folder, require=True)
        except manifest.IntegrityError as e:
            problems = [str(e)]
        if consolidated.is_consolidated(folder):  # an export is checked whether or not its manifest is there
            try:
                problems += consolidated.content_problems(folder)
            except CheckpointError as e:
                problems.append(str(e))
        out.append((folder, problems))
    return out
