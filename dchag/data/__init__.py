"""Data pipeline: channel-sharded readers, tiled datasets, layout-independent data order.

Training-loop entry points:

    from dchag.data import build_datasets, build_train_loader, build_eval_loader
    train_ds, valid_ds = build_datasets(args.data_path, args.data_format, task=args.task,
                                        img_h=args.img_h, img_w=args.img_w, num_channels=args.num_channels,
                                        channels=partition.rank_channels(cp_rank), lead_time=args.lead_time)
    loader = build_train_loader(train_ds, args.micro_batch_size, data_parallel_rank=dp_rank,
                                data_parallel_size=dp_size, seed=args.seed,
                                consumed_samples=consumed, global_batch_size=args.global_batch_size)
"""

from .build import build_datasets
from .dataset import TASKS, TileDataset, latitude_weights
from .errors import DataError
from .readers import FORMATS, Source, detect_format, open_source
from .sampler import (MicroBatchSampler, SampleOrder, build_eval_loader, build_train_loader, global_batch,
                      micro_batch)
from .stats import ChannelStats, compute_stats, load_stats, resolve_stats, save_stats, stats_path_for

__all__ = ["DataError", "FORMATS", "TASKS", "ChannelStats", "MicroBatchSampler", "SampleOrder", "Source",
           "TileDataset", "build_datasets", "build_eval_loader", "build_train_loader", "compute_stats",
           "detect_format", "global_batch", "latitude_weights", "load_stats", "micro_batch", "open_source",
           "resolve_stats", "save_stats", "stats_path_for"]
