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
``--dchag-groups`` when given; else the pretrained G; else, when the new data has fewer channels
than that, the largest multiple of P not above C'. Per-group weights then follow the group
whose centre is nearest (dchag/transfer/channels.py), and the final aggregation has no
per-group weight, so any G works.
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
            f"{', '.join(conflicts)}. Leave these flags out to take the pretrained values: its weights fit only those.")
    for dest, attr in DEFAULT_ONLY.items():
        if dest not in given:
            setattr(args, dest, getattr(pretrained, attr))


def resolve_groups(args, pretrained: DChagConfig) -> None:
    """Set ``args.dchag_groups`` for the new channels when the command line does not give it
    (module docstring)."""
    given = getattr(args, "given", None)
    if pretrained.aggregation == "flat" or given is None or "dchag_groups" in given:
        return
    C, G, P = args.num_channels, pretrained.groups, args.channel_parallel_size
    args.dchag_groups = G if C >= G else max(P, C // P * P)
