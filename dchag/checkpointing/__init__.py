"""Checkpoints: save, load, check, recover and convert. Training calls this layer; it never
imports ``dchag.training``.

- :mod:`errors`         ``CheckpointError``, raised by every check here
- :mod:`tags`           ``iter_NNNNNNN`` folders and the ``latest`` pointer
- :mod:`compat`         before training: what ``--load`` means, whether it fits, whether ``--save`` is safe
- :mod:`engine`         save and load a DeepSpeed engine's checkpoint (plus what DeepSpeed does not save)
- :mod:`rng`            every rank's RNG states, for an exact resume
- :mod:`universal`      ``universal_checkpoint_info``: affine maps of every parameter over the ranks
- :mod:`recovery`       damaged checkpoints: the last intact one and the command that resumes from it
- :mod:`manifest`       size + SHA-256 of every checkpoint file, written on save, checked on load
- :mod:`normalization`  the per-channel statistics training normalized with, saved per checkpoint
- :mod:`reader`         a DeepSpeed checkpoint (any T, P, DP, ZeRO 0-3, fp32/bf16) -> full tensors
- :mod:`consolidated`   full tensors <-> ``model.safetensors`` + ``config.json`` (no pickle)
- :mod:`shards`         how a full parameter is cut for a target layout (T, P)
- :mod:`convert`        the conversions behind tools/convert_checkpoint.py
- :mod:`weights_only`   ``--no-load-optim``: weights, iteration, data position and LR schedule; fresh moments
"""
