"""``--transformer-impl transformer_engine``: megatron's Transformer Engine layer spec for the
backbone (optional: only where NVIDIA Transformer Engine is installed; never required, not a
dependency). TE's fused attention then chooses its own kernel (flash / cuDNN fused / unfused).

Its parameter names differ from the local spec's (e.g. the input norm is fused into
``linear_qkv.layer_norm_weight``): a checkpoint does not move between ``local`` and
``transformer_engine``.
"""

from __future__ import annotations


def require_transformer_engine() -> None:
    from dchag.parallel.partition import LayoutError
    try:
        import transformer_engine  # noqa: F401
    except ImportError as e:
        raise LayoutError(
            "--transformer-impl transformer_engine needs NVIDIA Transformer Engine, which is not importable here "
            f"({e}). Install it on the GPU cluster (pip install transformer_engine[pytorch]), or use the default "
            "--transformer-impl local (with --attention-backend sdpa for fused attention kernels).") from e


def te_layer_spec():
    require_transformer_engine()
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    return get_gpt_layer_with_transformer_engine_spec()
