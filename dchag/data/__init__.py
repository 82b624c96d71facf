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

# Loaded on first use: the readers need numpy only, so the pre-flight (dchag.training.preflight)
# opens the data without importing torch (datasets and samplers do import it).
_EXPORTS = {"build_datasets": ".build", "TASKS": ".dataset", "TileDataset": ".dataset",
            "latitude_weights": ".dataset", "DataError": ".errors", "FORMATS": ".readers", "Source": ".readers",
            "detect_format": ".readers", "open_source": ".readers", "MicroBatchSampler": ".sampler",
            "SampleOrder": ".sampler", "build_eval_loader": ".sampler", "build_train_loader": ".sampler",
            "global_batch": ".sampler", "micro_batch": ".sampler", "ChannelStats": ".stats",
            "compute_stats": ".stats", "load_stats": ".stats", "resolve_stats": ".stats", "save_stats": ".stats",
            "stats_path_for": ".stats"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module 'dchag.data' has no attribute {name!r}")
