"""Fine-tuning a pretrained model onto another channel set, tile size or task.

    --finetune --pretrained-checkpoint PATH   (Megatron's flags) PATH: a consolidated export or a
                                              DeepSpeed checkpoint folder of any T, P; weights only
    --freeze-encoder                          a linear probe: only the head (and task conditioning) trains
    --new-params-lr-mult M                    new and interpolated tensors train at M x the rate
    --lora-rank R --lora-alpha A ...          LoRA adapters on the TP linears (dchag/model/lora.py); the loaded
                                              tensors frozen, the adapters, head, new and interpolated tensors train

The training loop calls three functions:

    pretrained = prepare(args)             before anything is built (no process group): the flags agree,
                                           the checkpoint is readable, its architecture fills the flags
                                           not given, conflicts are refused at once
    resolve_groups(args, pretrained)       G for the new channels (once the data's channels are known)
    apply(model, pretrained, args, ...)    between building the model and deepspeed.initialize: the
                                           weights, the start-up table, the lr-mult marks, the freeze

Modules: ``pretrained`` (reading PATH), ``architecture`` (flags, defaults, conflicts, G),
``channels`` (matching channels and groups), ``pos_embed`` (the grid change), ``plan`` (where
every parameter comes from), ``load`` (the plan applied to a rank's shards), ``report`` (the table).
"""

from __future__ import annotations

from dchag.transfer.architecture import check_flags, resolve_groups as _resolve_groups, take_architecture
from dchag.transfer.errors import FinetuneError
from dchag.transfer.load import copy_into, freeze_encoder, freeze_for_lora, is_new_parameter, mark_new_parameters
from dchag.transfer.plan import TransferPlan, full_shapes, plan_transfer
from dchag.transfer.pretrained import Pretrained, open_pretrained
from dchag.transfer.report import format_table

__all__ = ["FinetuneError", "Pretrained", "TransferPlan", "apply", "is_new_parameter", "plan_for", "prepare",
           "resolve_groups"]


def prepare(args) -> Pretrained | None:
    """The pre-flight (no process group): None without --finetune; else the pretrained model read
    (configuration and shapes only) with its architecture filled into ``args``."""
    check_flags(args)
    if not getattr(args, "finetune", False):
        return None
    pretrained = open_pretrained(args.pretrained_checkpoint)
    take_architecture(args, pretrained.cfg, pretrained.folder)
    return pretrained


def resolve_groups(args, pretrained: Pretrained) -> None:
    _resolve_groups(args, pretrained.cfg)


def plan_for(model, pretrained: Pretrained, prefer: str | None = None) -> TransferPlan:
    """The transfer plan for ``model`` (any layout; refuses a checkpoint that shares nothing);
    ``prefer``: --match-channels."""
    return plan_transfer(pretrained.cfg, pretrained.shapes, model.cfg, full_shapes(model),
                         set(model.task_parameter_names()), prefer)


def apply(model, pretrained: Pretrained, args, load_weights: bool = True, log=print) -> TransferPlan:
    """Between building the model and ``deepspeed.initialize``, on every rank: the pretrained
    weights (``load_weights``; a resume from --load takes its own), the marks behind
    --new-params-lr-mult and the --freeze-encoder probe, which a resume needs too (the same
    optimizer groups). ``log`` prints on rank 0."""
    plan = plan_for(model, pretrained, getattr(args, "match_channels", None))
    frozen = freeze_encoder(model) if getattr(args, "freeze_encoder", False) else None
    lora = freeze_for_lora(model, plan) if getattr(model.cfg, "lora_rank", 0) else None
    mark_new_parameters(model, plan)
    if load_weights:
        copy_into(model, plan, pretrained.tensors())
        given = getattr(args, "given", None)
        log(format_table(plan, pretrained.describe(), pretrained.shapes, full_shapes(model),
                         given is None or "dchag_groups" in given, args.channel_parallel_size, frozen,
                         getattr(args, "new_params_lr_mult", 1.0), lora))
    else:
        log(f"> resuming a fine-tune from --load; {pretrained.folder} (--pretrained-checkpoint) only decides which "
            f"parameters are new ({len(plan.names('new')) + len(plan.names('interpolated'))} tensors)"
            + (" and which train (--freeze-encoder)" if frozen is not None else "")
            + (" and which train (--lora-rank)" if lora is not None else ""))
    return plan
