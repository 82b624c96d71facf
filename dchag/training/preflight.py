"""Every check that needs no process group, run on every rank before one is made, every
problem reported at once.

A wrong command (a missing ``--data-path``, a typo in the DeepSpeed JSON, a layout that does not
divide the world, a ``--load`` that does not fit) fails here, in about a second: the quick checks
import no torch, DeepSpeed or megatron-core (tests/test_startup.py runs a wrong command under
``python -X importtime`` and checks), so they run before the launcher's ranks meet, before
``torch.distributed`` starts and before DeepSpeed builds its communication op.

A check is a function ``check(args, found) -> list[Exception]``: ``args`` is the parsed command
line, ``found`` (:class:`Found`) what earlier checks resolved; a check returns the problems it
found (user errors: ``ConfigError``, ``DataError``, ``LayoutError``, ``CheckpointError``, ...) and
may fill ``found``; a check whose input an earlier check could not resolve returns nothing (its
problem is already listed). New checks go into ``CHECKS``; ``LATE_CHECKS`` are the ones that
import DeepSpeed, run only once every quick check has passed (DeepSpeed is imported next anyway).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from dchag.parallel.partition import LayoutError
from dchag.training.ds_validate import ConfigError


class PreflightError(ValueError):
    """Several problems found before the start; ``problems`` holds the errors, the message one
    line per problem."""

    def __init__(self, problems: list[Exception]):
        self.problems = list(problems)
        lines = [line for p in self.problems for line in str(p).splitlines()]
        super().__init__(f"{len(lines)} problems, found before anything was started or written:\n"
                         + "\n".join(f"  - {line}" for line in lines))


@dataclass
class Found:
    """What the checks resolved, for the checks after them and for the run."""
    world_size: int
    data_parallel_size: int | None = None
    ds_config: dict | None = None
    num_channels: int | None = None
    pretrained: object = None  # dchag.transfer.Pretrained (--finetune)
    cfg: object = None  # DChagConfig
    universal: bool = False
    load_tag: str | None = None
    start_iteration: int = 0
    checked: list = field(default_factory=list)  # names of the checks that ran
    source: object = None  # the opened data (dchag.data Source): metadata only
    samples: dict | None = None  # {"train": n, "valid": n} of the data (tiles, or forecast samples)
    notes: list = field(default_factory=list)  # lines for the start-up summary
    fingerprint: dict | None = None  # the data's (dchag/data/fingerprint.py), recorded with every checkpoint
    blend: list | None = None  # a blend's sources (dchag.data.build.BlendSource), opened


# ---------------------------------------------------------------------------------------------
# the checks


def check_layout(args, found: Found) -> list[Exception]:
    """world = T x DP, P | T."""
    from dchag.parallel.partition import validate_layout
    try:
        validate_layout(found.world_size, args.tensor_model_parallel_size, args.channel_parallel_size)
    except LayoutError as e:
        return [e]
    found.data_parallel_size = found.world_size // args.tensor_model_parallel_size
    return []


def check_arguments(args, found: Found) -> list[Exception]:
    """Flag values that are wrong whatever the data and the layout."""
    out = []
    for flag, value, low in (("--train-iters", args.train_iters, 1), ("--log-interval", args.log_interval, 1),
                             ("--eval-iters", args.eval_iters, 1), ("--save-interval", args.save_interval, 1),
                             ("--eval-interval", args.eval_interval, 1), ("--exit-interval", args.exit_interval, 1),
                             ("--lr-decay-iters", args.lr_decay_iters, 1), ("--lr-warmup-iters", args.lr_warmup_iters, 0),
                             ("--num-workers", args.num_workers, 0), ("--lead-time", args.lead_time, 1)):
        if value is not None and value < low:
            out.append(ConfigError(f"{flag} must be >= {low}, got {value}."))
    for flag, value in (("--lr", args.lr), ("--min-lr", args.min_lr), ("--weight-decay", args.weight_decay)):
        if value < 0:
            out.append(ConfigError(f"{flag} must be >= 0, got {value:g}."))
    if args.min_lr > args.lr:
        out.append(ConfigError(f"--min-lr {args.min_lr:g} is above --lr {args.lr:g}: the schedule decays from --lr "
                               "down to --min-lr."))
    if args.dchag_partial_lr_mult < 0:
        out.append(ConfigError(f"--dchag-partial-lr-mult {args.dchag_partial_lr_mult}: a learning-rate multiplier must "
                               "be >= 0 (1 = the schedule's rate, 0 = frozen)."))
    for flag, value in (("--valid-fraction", args.valid_fraction), ("--mask-ratio", args.mask_ratio)):
        if not 0.0 <= value < 1.0:
            out.append(ConfigError(f"{flag} must be in [0, 1), got {value:g}."))
    if args.use_checkpoint_opt_param_scheduler and args.override_opt_param_scheduler:
        out.append(ConfigError("--use-checkpoint-opt-param-scheduler and --override-opt-param-scheduler exclude each "
                               "other; give one."))
    if args.exit_duration_in_mins is not None and args.exit_duration_in_mins <= 0:
        out.append(ConfigError(f"--exit-duration-in-mins must be > 0, got {args.exit_duration_in_mins:g}."))
    if args.ckpt_step is not None and not args.load:
        out.append(ConfigError(f"--ckpt-step {args.ckpt_step} picks a checkpoint of --load DIR; add --load."))
    return out


def check_save_folder(args, found: Found) -> list[Exception]:
    """``--save`` is a folder this job can write to (asked of the kernel, which counts read-only
    mounts and immutable folders; nothing is written: dchag.checkpointing.writable)."""
    from dchag.checkpointing.errors import CheckpointError
    from dchag.checkpointing.writable import check_writable
    try:
        check_writable(args.save)
    except CheckpointError as e:
        return [e]
    return []


def check_deepspeed_config(args, found: Found) -> list[Exception]:
    """The JSON against the command line (batch sizes, precision, clipping, ZeRO stage) and every
    unknown key in it; resolves ``args``' batch sizes, ``--bf16`` and ``--clip-grad``."""
    from dchag.training.ds_config import build_ds_config
    try:
        found.ds_config = build_ds_config(args, found.data_parallel_size or 1)
    except ConfigError as e:
        return [e]
    return []


FINETUNE_FLAGS = ("finetune", "pretrained_checkpoint", "freeze_encoder", "lora_rank", "lora_alpha", "lora_dropout",
                  "lora_targets")


def check_finetune(args, found: Found) -> list[Exception]:
    """``--finetune --pretrained-checkpoint PATH`` (dchag.transfer.prepare): the flags agree, PATH
    is a readable pretrained model, and the command line's architecture matches it (the flags not
    given take its values, so it runs before the data and model checks). It reads the model with
    torch (and DeepSpeed for a checkpoint folder), still without a process group: a command without
    the fine-tuning flags imports nothing here."""
    if not any(getattr(args, k, None) for k in FINETUNE_FLAGS) and getattr(args, "new_params_lr_mult", 1.0) == 1.0:
        return []
    from dchag import transfer
    try:
        found.pretrained = transfer.prepare(args)
    except transfer.FinetuneError as e:
        return [e]
    return []


def channel_identity(source) -> tuple[list[str], list | None]:
    """The data's channel names and wavelengths (nm, None where a channel has none)."""
    import math
    wavelengths = source.wavelengths
    return ([str(n) for n in source.channel_names],
            None if wavelengths is None else [float(w) if math.isfinite(float(w)) else None for w in wavelengths])


def check_data(args, found: Found) -> list[Exception]:
    """The data opens (path, format, readable header), has --num-channels channels, and is large
    enough for one tile and, for a forecast, for the lead time and the held-out period. Sets
    ``args.channel_names`` and ``args.wavelengths`` from the data's metadata."""
    from dchag.data.blend import is_blend
    if is_blend(args.data_path):
        return check_blend(args, found)
    from dchag.data.build import open_data_source
    from dchag.data.errors import DataError
    from dchag.data.readers.open import check_channel_axis
    from dchag.data.tiles import TileIndex, forecast_split, mae_split
    try:
        source = open_data_source(args.data_path, args.data_format, task=args.task, img_h=args.img_h, img_w=args.img_w,
                                  num_channels=args.num_channels, seed=args.seed,
                                  channels_last=getattr(args, "channels_last", False))
        if args.num_channels is None:  # a plain array without a channel count: refused, naming both readings
            check_channel_axis(source, None)
        if source.channel_axis_note:  # a shape that fits either layout: the reading, said once
            found.notes.append(source.channel_axis_note)
        found.num_channels, found.source = source.num_channels, source
        # the channels' identity: the model and every checkpoint record it, a fine-tune matches by it
        args.channel_names, args.wavelengths = channel_identity(source)
        where = f"{source.format} data {source.path}"
        from dchag.data.identity import channel_ids
        channel_ids(args.channel_names, args.wavelengths, where=where)  # wavelengths in nm (µm, Å refused)
        if args.task != "forecast":  # tiles of every image (mae, regress, segment)
            tiles = TileIndex([source.image_hw(i) for i in range(source.num_images)], args.img_h, args.img_w, where)
            found.samples = {split: len(mae_split(tiles.num_samples, split, args.valid_fraction))
                             for split in ("train", "valid")}
        else:
            N, _, H, W = source.shape
            if H is None:
                raise DataError(f"forecast needs one grid for all time steps, but {source.describe()} mixes image "
                                "sizes; regrid the files to one grid.")
            per_time = TileIndex([(H, W)], args.img_h, args.img_w, where).num_samples
            found.samples = {split: len(forecast_split(N, args.lead_time, split, args.valid_fraction)) * per_time
                             for split in ("train", "valid")}
    except DataError as e:
        return [e]
    return []


def check_blend(args, found: Found) -> list[Exception]:
    """A blended ``--data-path W1 P1 W2 P2 ...`` (dchag/data/blend.py): every source opens as it would
    alone, their channels form one union (matched by name, then wavelength), and the run pretrains
    (--task mae). Sets ``args.channel_names``/``args.wavelengths`` to the union's and
    ``args.data_sources`` (per source: name, path, weight, union ids, sample counts), from which the
    model's config takes its sources (``args.sources``, ``args.source_names``)."""
    from dchag.data.blend import parse_data_path
    from dchag.data.build import open_blend, union_identity
    from dchag.data.errors import DataError
    try:
        spec = parse_data_path(args.data_path)
    except DataError as e:
        return [e]
    if not spec.is_blend:  # '--data-path 1.0 A': one source, the run of --data-path A
        args.data_path = spec.paths[0]
        return check_data(args, found)
    out = []
    if args.task != "mae":
        out.append(ConfigError(f"--task {args.task} with a blend of {len(spec.paths)} sources: a blend "
                               "pretrains (--task mae); fine-tune or train a task on one source (--data-path FILE)."))
    if getattr(args, "finetune", False):
        out.append(ConfigError("--finetune with a blended --data-path: a fine-tune reads one source; give one "
                               "--data-path (the blend's union is matched by --pretrained-checkpoint)."))
    try:
        union, sources = open_blend(spec, args.data_format, img_h=args.img_h, img_w=args.img_w,
                                    valid_fraction=args.valid_fraction, seed=args.seed,
                                    prefer=getattr(args, "match_channels", None))
    except DataError as e:
        return out + [e]
    if args.num_channels is not None and args.num_channels != len(union):
        out.append(DataError(
            f"--num-channels {args.num_channels}, but the blend's sources hold {len(union)} distinct channels ("
            + ", ".join(f"{s.name}: {s.source.num_channels}" for s in sources) + "; a channel two sources share, "
            f"by name or wavelength, counts once); drop --num-channels or give {len(union)}."))
    found.num_channels, found.blend = len(union), sources
    args.channel_names, args.wavelengths = union_identity(union, sources)
    args.data_sources = [s.record() for s in sources]
    # the model's sources (DChagConfig.sources / source_names, through dchag.arguments.model_config)
    args.sources, args.source_names = [list(s.channels) for s in sources], [s.name for s in sources]
    return out


def check_task(args, found: Found) -> list[Exception]:
    """The task's own flags and files (``Task.prepare_args``, dchag/tasks/flags.py: --target-path
    and --num-classes for regress and segment, refused for the others); sets ``args.num_outputs``.
    Runs once the data has opened (the targets are checked against it)."""
    if found.num_channels is None:
        return []
    from dchag.data.errors import DataError
    from dchag.tasks.flags import prepare_args
    try:
        prepare_args(args)
    except DataError as e:
        return [e]
    return []


def check_model(args, found: Found) -> list[Exception]:
    """The model's sizes (patch, heads, groups, tree levels) and their fit to the layout (with
    --num-channels when the data could not be opened)."""
    num_channels = found.num_channels or args.num_channels
    if num_channels is None:
        return []
    from dchag.arguments import model_config
    from dchag.model.config import TASK_MODELS
    if TASK_MODELS[args.task].planes == "num_outputs" and getattr(args, "num_outputs", None) is None:
        return []  # the head's size comes from the targets, which could not be read (listed already)
    if found.pretrained is not None and found.num_channels:  # a fine-tune's G for the new channels
        from dchag import transfer
        args.num_channels = found.num_channels
        try:  # matches the channels (a contradicting name, a wavelength unit refused here)
            transfer.resolve_groups(args, found.pretrained)
        except transfer.FinetuneError as e:
            return [e]
    elif getattr(args, "finetune", False):  # the pretrained model (its G) could not be read: listed already
        return []
    try:
        cfg = model_config(args, num_channels)
        cfg.validate_layout(args.tensor_model_parallel_size, args.channel_parallel_size)
        found.cfg = cfg if found.num_channels else None
    except LayoutError as e:
        return [e]
    return []


def check_memory(args, found: Found) -> list[Exception]:
    """The run fits the memory of this machine's GPU (or host): dchag/planner's per-rank estimate
    (parameters, optimizer state, activations, the input batch) against it
    (dchag.training.memory_fit), so absurd sizes are refused here, not by the allocator minutes later."""
    if found.cfg is None or found.ds_config is None or found.data_parallel_size is None:
        return []
    from dchag.training import memory_fit
    try:
        memory_fit.check(args, found.cfg, found.ds_config, found.data_parallel_size)
    except ConfigError as e:
        return [e]
    return []


def check_checkpoint(args, found: Found) -> list[Exception]:
    """``--load``: the checkpoint to resume from exists and was saved with this model and layout;
    ``--save``: no live job holds its lock and it holds no checkpoint this run would overwrite
    (dchag.checkpointing.compat's checks). Changes nothing: the lock is taken, and interrupted saves
    are moved aside, by the run (``dchag.training.loop``), after the pre-flight."""
    if not (args.load or args.save) or found.num_channels is None or found.ds_config is None:
        return []
    from dchag.checkpointing import compat, lock, tags
    from dchag.checkpointing.errors import CheckpointError
    args.num_channels = found.num_channels  # the checkpoint records the resolved count
    found.universal = bool((found.ds_config.get("checkpoint") or {}).get("load_universal"))
    if not found.universal and tags.is_universal(args.load):  # tools/convert_checkpoint.py --format universal output
        found.ds_config.setdefault("checkpoint", {})["load_universal"] = found.universal = True
    try:
        found.load_tag = compat.check_compatible(args, found.universal)
        start = tags.iteration_of(found.load_tag) if found.load_tag else 0
        found.start_iteration = start if start is not None else 0
        if args.save:  # read-only: the run takes the lock and moves interrupted saves aside under it
            lock.check(args.save)
            compat.check_save_dir_unchanged(args, found.start_iteration)
    except CheckpointError as e:
        return [e]
    return []


def check_data_change(args, found: Found) -> list[Exception]:
    """The data's fingerprint (sizes, shapes, channels, sample counts, a digest of fixed windows:
    dchag/data/fingerprint.py), recorded with every checkpoint; on resume, compared with the one the
    checkpoint recorded (dchag/checkpointing/fingerprint.py): changed data is refused unless
    --allow-data-change (a resume normalizes with its checkpoint's statistics, whatever
    the data: ``dchag.training.loop._saved_normalization``)."""
    if (found.source is None and not found.blend) or not (args.save or found.load_tag):
        return []
    from dchag.checkpointing import fingerprint as recorded
    from dchag.checkpointing.errors import CheckpointError
    from dchag.data.errors import DataError
    from dchag.data.fingerprint import fingerprint, source_record
    try:
        if found.blend:  # every source of a blend under its name
            found.fingerprint = fingerprint({s.name: source_record(s.source, {"train": s.train_samples,
                                                                           "valid": s.valid_samples})
                                             for s in found.blend})
        else:
            found.fingerprint = fingerprint({"data": source_record(found.source, found.samples)})
        if found.load_tag:
            note, _ = recorded.check_resume(args.load, found.load_tag, found.fingerprint,
                                                  getattr(args, "allow_data_change", False))
            if note:
                found.notes.append(note)
    except (CheckpointError, DataError) as e:
        return [e]
    return []


def check_deepspeed_values(args, found: Found) -> list[Exception]:
    """The JSON's sections through DeepSpeed's own models (types and values; imports DeepSpeed)."""
    from dchag.training.ds_config import load_json
    from dchag.training.ds_validate import value_problems
    path = args.deepspeed_config
    problems = value_problems(load_json(path), path) if path else []
    return [ConfigError(problems)] if problems else []


def read_channel_identity(args) -> None:
    """The data check alone: ``args.num_channels`` (``--num-channels`` checked against the data),
    ``args.channel_names`` and ``args.wavelengths`` from the data's metadata, or its DataError."""
    found = Found(world_size=1)
    problems = check_data(args, found)
    if problems:
        raise problems[0]
    args.num_channels = found.num_channels


CHECKS = [check_layout, check_arguments, check_save_folder, check_deepspeed_config, check_finetune, check_data, check_task,
          check_model, check_memory, check_checkpoint, check_data_change]
LATE_CHECKS = [check_deepspeed_values]


def world_size() -> int:
    """The job's size as the launcher set it (``dchag.training.launch.resolve``), or the process
    group's when one exists already (tests, notebooks)."""
    import sys
    if "torch" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def run(args, world: int | None = None, checks=None, late_checks=None) -> Found:
    """Run every check; raise the one problem found, or a ``PreflightError`` listing them all.
    Fills ``args.num_channels`` and the batch sizes / precision / clipping the JSON resolves."""
    found = Found(world_size=world_size() if world is None else world)
    problems = []
    for group in (CHECKS if checks is None else checks, LATE_CHECKS if late_checks is None else late_checks):
        if problems:
            break
        for check in group:
            problems += check(args, found)
            found.checked.append(check.__name__)
    if len(problems) == 1 and not (isinstance(problems[0], ConfigError) and len(problems[0].problems) > 1):
        raise problems[0]
    if problems:
        raise PreflightError(problems)
    args.num_channels = found.num_channels
    return found
