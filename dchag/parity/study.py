"""Train every method x seed on the same data, steps and LR schedule, in one launch.

Every rank runs the study (``torchrun --nproc_per_node N tools/parity.py ...``); each run is
``dchag.training.run`` in-process, with the study's pretrain flags, the method's overrides
(methods.py) and ``--seed base + i``; the seed fixes initial weights, data order and MAE masks
alike for every method (the comparison is paired). The data itself does not change with the
seed (synthetic data is pinned to the base seed). Rank 0 writes the report.
"""

from __future__ import annotations

import copy
import os
import time

import torch.distributed as dist

from dchag.arguments import model_config
from dchag.parallel.partition import LayoutError
from dchag.parity.methods import Method
from dchag.tasks import get_task

PICTURE_TILES = 4  # held-out tiles shown per method


def _print0(msg: str) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(msg, flush=True)


def pin_synthetic_seed(data_path: str, seed: int) -> str:
    """Synthetic data draws its scene from --seed unless the spec names one: pin it, so every
    seed of the study trains on the same data."""
    if not str(data_path).startswith("synthetic") or "seed=" in str(data_path):
        return data_path
    sep = "," if ":" in data_path else ":"
    return f"{data_path}{sep}seed={seed}"


def _open_valid(args):
    """The held-out split at P = 1 (all channels): its dataset, description and config."""
    from dchag.data import build_datasets
    from dchag.training.preflight import read_channel_identity
    read_channel_identity(args)
    get_task(args.task).prepare_args(args)
    cfg = model_config(args)
    _, valid = build_datasets(args.data_path, args.data_format, task=args.task, img_h=args.img_h, img_w=args.img_w,
                              channels=None, num_channels=args.num_channels, lead_time=args.lead_time,
                              valid_fraction=args.valid_fraction, strict=args.data_strict, seed=args.seed,
                              target_path=args.target_path, num_classes=args.num_classes,
                              ignore_index=args.ignore_index, lat_weighting=args.lat_weighting)
    return valid, cfg


def describe_split(valid) -> str:
    return get_task(valid.task).describe_split(valid)


class PictureCollector:
    """``non_loss_data_func`` of the first seed of each method: the held-out pictures' arrays."""

    def __init__(self):
        self.by_method: dict[str, dict] = {}
        self.current: str | None = None

    def __call__(self, model, valid_factory, args, cfg, iteration, writer) -> None:
        self.by_method[self.current] = get_task(args.task).picture_arrays(model, valid_factory, args, cfg,
                                                                          PICTURE_TILES)


def run_study(argv: list[str], methods: list[Method], num_seeds: int, output_dir: str, *, model_provider,
              forward_step, datasets_provider, eval_metrics_func=None, loss_weight_func=None) -> dict | None:
    """Train every method x seed; returns the results on rank 0 (None elsewhere)."""
    from dchag.arguments import parse_args
    from dchag.data import build_eval_loader
    from dchag.data.sampler import eval_scored
    from dchag.training import release, run
    from dchag.training.initialize import init_distributed

    base = parse_args(argv)
    base.data_path = pin_synthetic_seed(base.data_path, base.seed)
    if base.save or base.load:
        raise LayoutError("tools/parity.py trains from scratch and keeps no checkpoints: drop --save/--load.")
    if not base.eval_interval:
        base.eval_interval = max(1, base.train_iters // 10)
    if base.train_iters % base.eval_interval:
        raise LayoutError(f"--eval-interval {base.eval_interval} must divide --train-iters {base.train_iters}: the "
                          "study compares the validation loss at the last iteration.")
    init_distributed()
    valid, cfg = _open_valid(copy.deepcopy(base))
    if base.global_batch_size is None or base.micro_batch_size is None:
        raise LayoutError("tools/parity.py needs --micro-batch-size and --global-batch-size on the command line.")
    scored = eval_scored(len(valid), base.global_batch_size, 1, base.eval_iters)
    split = describe_split(valid)
    _print0(f"[parity] {split}; {len(valid)} held-out samples, each evaluation scores {scored} of them once")
    seeds = [base.seed + i for i in range(num_seeds)]
    logs = os.path.join(output_dir, "logs")
    if not dist.is_initialized() or dist.get_rank() == 0:
        os.makedirs(logs, exist_ok=True)

    pictures = PictureCollector()
    results = {"methods": {}, "seeds": seeds}
    total, done = len(methods) * len(seeds), 0
    for method in methods:
        label = method.label(base.dchag_groups, base.dchag_tree_levels)
        entry = {"label": label, "spec": method.spec, "val_loss": [], "train_loss": [], "curves": {}, "metrics": [],
                 "seconds": []}
        for i, seed in enumerate(seeds):
            args = copy.deepcopy(base)
            for k, v in method.overrides(base).items():
                setattr(args, k, v)
            args.seed = seed
            args.log_file = os.path.join(logs, f"{method.spec.replace(':', '_')}-seed{seed}.log")
            if not dist.is_initialized() or dist.get_rank() == 0:
                open(args.log_file, "w").close()  # this run's log only (the run appends to it)
            if dist.is_initialized():
                dist.barrier()  # rank 0 made the folder and the empty log
            pictures.current = method.spec
            t0 = time.time()
            history = run(args, model_provider, forward_step, datasets_provider,
                          non_loss_data_func=pictures if i == 0 else None, eval_metrics_func=eval_metrics_func,
                          loss_weight_func=loss_weight_func)
            seconds = time.time() - t0
            val = history["val_losses"]
            last = max(val)
            tail = [history["losses"][k] for k in sorted(history["losses"])[-max(1, args.train_iters // 10):]]
            entry["val_loss"].append(val[last])
            entry["train_loss"].append(sum(tail) / len(tail))
            entry["curves"][str(seed)] = {"iterations": sorted(val), "val_loss": [val[k] for k in sorted(val)]}
            entry["metrics"].append(history["val_metrics"].get(last, {}))
            entry["seconds"].append(seconds)
            release(history)
            done += 1
            _print0(f"[parity] ({done}/{total}) {label} seed {seed}: val loss {val[last]:.6E} at iteration {last} "
                    f"({seconds:.0f} s)")
        results["methods"][method.spec] = entry

    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    loader = build_eval_loader(valid, base.micro_batch_size, num_micro_batches=None if base.eval_iters is None else
                               base.eval_iters * (base.global_batch_size // base.micro_batch_size))
    results["baselines"] = get_task(base.task).baselines(loader, cfg, base)
    results["pictures"] = pictures.by_method
    results["setup"] = {"argv": argv, "task": base.task, "data_path": base.data_path, "split": split,
                        "held_out_samples": len(valid), "scored_per_evaluation": scored,
                        "train_iters": base.train_iters, "num_channels": cfg.num_channels,
                        "tensor_model_parallel_size": base.tensor_model_parallel_size,
                        "channel_parallel_size": base.channel_parallel_size}
    return results
