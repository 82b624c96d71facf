"""The task's own flags, checked without torch (the pre-flight runs this before any heavy import):
``--target-path`` and ``--num-classes`` are read by the dense tasks only; regress and segment open
their targets and fit them to the input; ``args.num_outputs`` is the dense head's planes (None for
mae and forecast). ``Task.prepare_args`` is this function."""

from __future__ import annotations

from dchag.data.errors import DataError

DENSE = ("regress", "segment")


def prepare_args(args, task: str | None = None) -> None:
    """Refuse flags ``task`` (default ``args.task``) does not read; set ``args.num_outputs``."""
    task = task or args.task
    if task not in DENSE:
        given = [flag for flag, value in (("--target-path", getattr(args, "target_path", None)),
                                          ("--num-classes", getattr(args, "num_classes", None))) if value]
        if given:
            raise DataError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} read by --task regress "
                            f"and segment only, not by --task {task}; drop {' and '.join(given)} or change --task.")
        args.num_outputs = None
        return
    num_classes, ignore = getattr(args, "num_classes", None), getattr(args, "ignore_index", 255)
    if task == "segment":
        if not num_classes or num_classes < 2:
            raise DataError(f"--task segment needs --num-classes K >= 2 (the classes of the map at --target-path), "
                            f"got {num_classes}.")
        if ignore is not None and 0 <= ignore < num_classes:
            raise DataError(f"--ignore-index {ignore} is one of the --num-classes {num_classes} classes "
                            f"[0, {num_classes}); choose a value outside them (the common 255, or -1).")
    elif num_classes:
        raise DataError("--num-classes is read by --task segment only; drop it for --task regress.")
    # The target file must exist and fit the input (image count and sizes); a class map's values are
    # checked here (the count needed named), a regression map's when the datasets are built.
    from dchag.data.build import open_data_source
    from dchag.data.targets import open_targets
    data = open_data_source(args.data_path, args.data_format, task=task, img_h=args.img_h, img_w=args.img_w,
                            num_channels=args.num_channels, seed=args.seed,
                            channels_last=getattr(args, "channels_last", False))
    targets = open_targets(args.target_path, data, kind=task, num_classes=num_classes, ignore_index=ignore)
    if task == "segment":
        targets.check_classes(data)
    args.num_outputs = targets.num_planes if task == "regress" else targets.num_classes

