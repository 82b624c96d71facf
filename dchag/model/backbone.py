"""The ViT backbone: megatron-core's TransformerBlock with a no-mask local layer spec."""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

from dchag.model.config import DChagConfig
from dchag.model.init import mark_weight_matrix


def transformer_config(cfg: DChagConfig, tensor_parallel_size: int):
    from megatron.core.transformer.transformer_config import TransformerConfig
    kwargs = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_size,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=cfg.sequence_parallel and tensor_parallel_size > 1,
        hidden_dropout=cfg.hidden_dropout,
        attention_dropout=cfg.attention_dropout,
        layernorm_epsilon=cfg.layernorm_epsilon,
        bf16=cfg.bf16,
        params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if cfg.bf16 else torch.float32,
        # Full master weights drawn from the global RNG, then sliced: the same initial model on
        # every T (slower init on GPU, but loss curves stay comparable across layouts).
        use_cpu_initialization=True,
        init_method_std=0.02,
    )
    if cfg.recompute_activations:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if not torch.cuda.is_available():
        from megatron_patches.cpu import cpu_transformer_config_overrides
        kwargs.update(cpu_transformer_config_overrides())
    return TransformerConfig(**kwargs)


def without_sequence_parallel(config):
    """The same config for TP layers that sit outside the sequence-parallel region."""
    return dataclasses.replace(config, sequence_parallel=False)


def no_mask_layer_spec():
    """megatron's local GPT layer spec with the causal mask replaced by no mask (a ViT)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.enums import AttnMaskType
    spec = copy.deepcopy(get_gpt_layer_local_spec())
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def build_backbone(config):
    from megatron.core.transformer.transformer_block import TransformerBlock
    return TransformerBlock(config, no_mask_layer_spec(), post_layer_norm=True, pre_process=True, post_process=True)


def mark_linear_weight_matrices(module: nn.Module) -> None:
    """Tag the weights of megatron's TP linear layers (and torch's) as weight matrices, for
    weight decay; their biases and the norms stay untagged."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    for m in module.modules():
        if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            mark_weight_matrix(m.weight)
