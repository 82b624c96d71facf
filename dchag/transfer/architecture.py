"""What a fine-tune takes from the pretrained model's architecture (checks without a process group).

Flags the command line does not give take the pretrained model's values; given and different,
they are listed together in one error (the weights fit only the pretrained shapes):

    --num-layers --hidden-size --num-attention-heads --ffn-hidden-size --dchag-aggregation
    --dchag-tree-levels --dchag-cross-projections --dchag-group-norm --patch-dim --transformer-impl

``--task`` and ``--channel-embedding`` default to the pretrained model's too, but may change (a
new task gets a new head; the wavelength embedding is a fixed buffer, no weight). The tile size
(``--img-h``/``--img-w``) may change: the position embedding is interpolated.

The groups (:func:`resolve_groups`) are formed by count over the new channels, in the data's
order (the same contiguous near-equal split as pretraining, ``ChannelPartition``):
``--dchag-groups`` when given; else, when the new channels are a subset of the pretrained ones
(every one copied by name or wavelength, none twice), the multiple of P that keeps the most
pretrained groups whole (the same channels in the same order: such a group's token is the
pretrained one, so a subset made of whole groups starts as the pretrained computation on them);
else the pretrained G; else, when the new data has fewer channels than that, the largest multiple
of P not above C'. Per-group weights then follow the group kept whole or the one whose centre is
nearest (dchag/transfer/channels.py), and the final aggregation has no per-group weight, so any G
works.
"""

from __future__ import annotations

from dchag.model.config import DChagConfig
from dchag.transfer.errors import FinetuneError

# flag dest -> DChagConfig attribute that must agree
MUST_MATCH = {"num_layers": "num_layers", "hidden_size": "hidden_size", "num_attention_heads": "num_attention_heads",
              "ffn_hidden_size": "ffn_size", "dchag_aggregation": "aggregation", "dchag_tree_levels": "tree_levels",
              "dchag_cross_projections": "cross_projections", "dchag_group_norm": "group_norm",
              "patch_dim": "patch_dim", "transformer_impl": "transformer_impl"}
# flag dest -> attribute taken when not given, free to change
DEFAULT_ONLY = {"task": "task", "channel_embedding": "channel_embedding"}


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_flags(args) -> None:
    """The fine-tuning flags agree with each other (with or without --finetune)."""
    finetune, path = getattr(args, "finetune", False), getattr(args, "pretrained_checkpoint", None)
    if finetune and not path:
        raise FinetuneError("--finetune needs --pretrained-checkpoint PATH: a consolidated export "
                            "(tools/convert_checkpoint.py --format consolidated) or a checkpoint folder --save wrote "
                            "(--load is the folder this run resumes from, not the pretrained model).")
    if path and not finetune:
        raise FinetuneError(f"--pretrained-checkpoint {path} is read only with --finetune: add --finetune (weights "
                            "only, iteration 0), or use --load to resume that run.")
    if not finetune:
        for flag, used in (("--freeze-encoder", getattr(args, "freeze_encoder", False)),
                           ("--new-params-lr-mult", getattr(args, "new_params_lr_mult", 1.0) != 1.0)):
            if used:
                raise FinetuneError(f"{flag} applies to a fine-tune: add --finetune --pretrained-checkpoint PATH.")
    if getattr(args, "new_params_lr_mult", 1.0) < 0:
        raise FinetuneError(f"--new-params-lr-mult {args.new_params_lr_mult}: a learning-rate multiplier must be >= 0.")
    _check_lora(args, finetune)


def _check_lora(args, finetune: bool) -> None:
    from dchag.arguments import lora_targets
    from dchag.model.lora import LoRAError, LoRASpec, check
    rank = getattr(args, "lora_rank", 0) or 0
    others = [flag for flag, used in (("--lora-alpha", getattr(args, "lora_alpha", None) is not None),
                                      ("--lora-dropout", bool(getattr(args, "lora_dropout", 0.0))),
                                      ("--lora-targets", getattr(args, "lora_targets", None) is not None)) if used]
    if not rank:
        if others:
            raise FinetuneError(f"{', '.join(others)} without --lora-rank R: add --lora-rank (e.g. 8), or drop them.")
        return
    if not finetune:
        raise FinetuneError("--lora-rank adapts a pretrained model: add --finetune --pretrained-checkpoint PATH (LoRA "
                            "on a randomly initialized, frozen base would learn only the adapters).")
    if getattr(args, "freeze_encoder", False):
        raise FinetuneError("--lora-rank and --freeze-encoder exclude each other: LoRA freezes the pretrained weights "
                            "and trains adapters on them; --freeze-encoder trains only the head. Give one.")
    alpha = getattr(args, "lora_alpha", None)
    try:
        check(LoRASpec(rank, float(rank if alpha is None else alpha), float(getattr(args, "lora_dropout", 0.0) or 0.0),
                       lora_targets(args) or ("qkv", "proj", "fc1", "fc2")))
    except LoRAError as e:
        raise FinetuneError(str(e)) from e


def take_architecture(args, pretrained: DChagConfig, where: str) -> None:
    """Fill the flags not given from ``pretrained``; refuse every given one that differs, at once."""
    given = getattr(args, "given", None)
    if given is None:  # a Namespace not made by dchag.arguments.parse_args: treat every flag as given
        given = frozenset(vars(args))
    conflicts = []
    for dest, attr in MUST_MATCH.items():
        want = getattr(pretrained, attr)
        if dest not in given:
            setattr(args, dest, want)
            continue
        have = getattr(args, dest)
        if dest == "ffn_hidden_size" and have is None:
            have = 4 * args.hidden_size
        if have != want:
            conflicts.append(f"{_flag(dest)} {have} (pretrained: {want})")
    if conflicts:
        raise FinetuneError(
            f"--finetune: the command line's architecture differs from the pretrained model's ({where}): "
            f"{', '.join(conflicts)}. Leave these flags out (each then takes the pretrained value) or give the "
            "pretrained values: its weights fit only those.")
    for dest, attr in DEFAULT_ONLY.items():
        if dest not in given:
            setattr(args, dest, getattr(pretrained, attr))
    if getattr(args, "lora_rank", 0) and args.transformer_impl != "local":
        raise FinetuneError(f"--lora-rank adapts megatron-core's local Column/RowParallelLinear layers, but the model "
                            f"is built with --transformer-impl {args.transformer_impl} ({where}).")


def data_channels(args):
    """This run's channels as the matching sees them (count, names, wavelengths)."""
    from types import SimpleNamespace
    return SimpleNamespace(num_channels=args.num_channels, channel_names=getattr(args, "channel_names", None),
                           wavelengths=getattr(args, "wavelengths", None))


def group_rule(pretrained: DChagConfig, matches: list, channel_parallel_size: int) -> tuple[int, str]:
    """(G, why) for the new channels, each matched as ``matches`` say (module docstring)."""
    from dchag.transfer.channels import subset_groups
    C, G, P = len(matches), pretrained.groups, channel_parallel_size
    subset = subset_groups(pretrained, matches, P)
    if subset is not None:
        return subset[0], (f"the {C} channels are a subset of the pretrained ones: G = {subset[0]} keeps "
                           f"{subset[1]} pretrained group(s) whole")
    if C >= G:
        return G, "the pretrained G"
    return max(P, C // P * P), (f"fewer channels than the pretrained G: the largest multiple of "
                                f"--channel-parallel-size {P} not above {C}")


def resolve_groups(args, pretrained: DChagConfig) -> None:
    """Match this run's channels to the pretrained ones (its refusals, before any process group), and
    set ``args.dchag_groups`` when the command line does not give it (module docstring)."""
    from dchag.transfer.channels import match_channels
    matches = match_channels(pretrained, data_channels(args), getattr(args, "match_channels", None))
    given = getattr(args, "given", None)
    if pretrained.aggregation == "flat" or given is None or "dchag_groups" in given:
        return
    args.dchag_groups = group_rule(pretrained, matches, args.channel_parallel_size)[0]
