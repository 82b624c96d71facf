"""Checkpoint integrity, normalization statistics, and conversion between layouts and formats.

- :mod:`manifest`       size + SHA-256 of every checkpoint file, written on save, checked on load
- :mod:`normalization`  the per-channel statistics training normalized with, saved per checkpoint
- :mod:`reader`         a DeepSpeed checkpoint (any T, P, DP, ZeRO 0-3, fp32/bf16) -> full tensors
- :mod:`consolidated`   full tensors <-> ``model.safetensors`` + ``config.json`` (no pickle)
- :mod:`shards`         how a full parameter is cut for a target layout (T, P)
- :mod:`convert`        the conversions behind tools/convert_checkpoint.py
- :mod:`weights_only`   ``--no-load-optim``: weights, iteration, data position and LR schedule; fresh moments
"""
