"""The pretrained model behind --pretrained-checkpoint PATH, read without a process group.

PATH is a consolidated export (``config.json`` + ``model.safetensors``) or a DeepSpeed checkpoint
folder of pretrain_dchag.py (a run folder with ``latest``, or one ``iter_NNNNNNN`` folder) of any
T, P, ZeRO stage and precision. :func:`open_pretrained` reads only its configuration and its
tensors' names and shapes (cheap: the pre-flight); :meth:`Pretrained.tensors` reads the full,
layout-free fp32 tensors (DeepSpeed folders: ``dchag.checkpointing.reader`` merges every shard).

A model trained with LoRA (its checkpoint holds ``<linear>.lora.A``/``.B``) is the model with its
adapters merged, W + (alpha / r) B A: that is what a fine-tune starts from (its own adapters, if
any, start new).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dchag.checkpointing import consolidated, normalization, reader
from dchag.model.config import DChagConfig
from dchag.transfer.errors import FinetuneError


@dataclass(frozen=True)
class Pretrained:
    path: str  # as given
    kind: str  # "export" | "deepspeed"
    folder: str  # the export, or the resolved iter_NNNNNNN folder
    cfg: DChagConfig  # its model, with its channels' names and wavelengths
    shapes: dict  # parameter name -> full shape
    iteration: int
    layout: tuple[int, int] | None  # (T, P) it was saved with
    lora: object = None  # dchag.model.lora.LoRASpec of a checkpoint holding adapters (merged on reading)
    adapters: tuple = ()  # their parameter names

    def describe(self) -> str:
        where = f"saved at T = {self.layout[0]}, P = {self.layout[1]}" if self.layout else "layout unknown"
        what = "consolidated export" if self.kind == "export" else "DeepSpeed checkpoint"
        return f"{self.folder} ({what}, iteration {self.iteration}, {where})"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every parameter whole, fp32 (the manifest checked first)."""
        if self.kind == "export":
            # check_model=False: the shapes the export's config implies come from a serial model,
            # which cannot be built inside a T > 1 run; the transfer plan compares every tensor's
            # shape with the new model's instead. The header and memory checks still run.
            tensors, _ = consolidated.read(self.folder, check_model=False)
        else:
            reader.check_integrity(self.folder)
            tensors, _ = reader.read_full_state_dict(self.folder, list(self.shapes) + list(self.adapters))
        tensors = {name: t.float() for name, t in tensors.items()}
        if self.lora is not None:
            from dchag.model.lora import merge
            tensors = merge(tensors, self.lora)
        return tensors


def open_pretrained(path: str) -> Pretrained:
    flag = f"--pretrained-checkpoint {path}"
    if not os.path.exists(path):
        raise FinetuneError(f"{flag} does not exist; give a consolidated export (tools/convert_checkpoint.py --format "
                            "consolidated) or a checkpoint folder written by --save.")
    try:
        if consolidated.is_consolidated(path):
            return _merged(_open_export(path))
        return _merged(_open_deepspeed(path))
    except FinetuneError:
        raise
    except Exception as e:  # noqa: BLE001 - CheckpointError, LayoutError, a damaged file: one message
        raise FinetuneError(f"{flag} cannot be read as a pretrained dchag model: {e}") from e


def _merged(pretrained: Pretrained) -> Pretrained:
    """A checkpoint with LoRA adapters as the model they make: its config without LoRA, its shapes
    without the adapters (which :meth:`Pretrained.tensors` reads and merges)."""
    import dataclasses
    from dchag.model.lora import adapter_names, spec_of
    spec = spec_of(pretrained.cfg)
    if spec is None:
        return pretrained
    adapters = tuple(adapter_names(pretrained.shapes))
    shapes = {n: s for n, s in pretrained.shapes.items() if n not in adapters}
    cfg = dataclasses.replace(pretrained.cfg, lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_targets=None)
    return dataclasses.replace(pretrained, cfg=cfg, shapes=shapes, lora=spec, adapters=adapters)


def _open_export(path: str) -> Pretrained:
    from safetensors import safe_open
    config = consolidated.read_config(path)
    model = dict(config.get("model") or {})
    for key in ("channel_names", "wavelengths"):  # exports made before the model recorded them
        if model.get(key) is None and config.get(key) is not None:
            model[key] = config[key]
    cfg = consolidated.config_from_dict(model)
    with safe_open(os.path.join(path, consolidated.WEIGHTS), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    source = config.get("source") or {}
    layout = (int(source["tensor_model_parallel_size"]), int(source["channel_parallel_size"])) \
        if "tensor_model_parallel_size" in source else None
    return Pretrained(path, "export", path, cfg, shapes, int(config.get("iteration", 0)), layout)


def _open_deepspeed(path: str) -> Pretrained:
    from deepspeed.checkpoint import constants as C
    from deepspeed.checkpoint.affine import ParamAffineMap
    from dchag.checkpointing.convert import config_of_run
    folder = reader.resolve_folder(path)
    state = reader.client_state(folder)
    ns = reader.run_args(folder, state)
    cfg = config_of_run(ns, normalization.read(folder))
    maps = ((state.get("universal_checkpoint_info") or {}).get(C.AFFINE_MAP) or {}).get(C.AFFINE_MAP_PARAMS) or {}
    if not maps:
        raise FinetuneError(f"{folder} carries no parameter maps (universal_checkpoint_info; saved by an older "
                            "version?): export it with tools/convert_checkpoint.py --format consolidated first.")
    shapes = {reader.param_name(pattern): ParamAffineMap.from_dict(entry).logical_shape
              for pattern, entry in maps.items()}
    return Pretrained(path, "deepspeed", folder, cfg, shapes, int(state.get("iteration", 0)),
                      (int(ns.tensor_model_parallel_size), int(ns.channel_parallel_size)))
