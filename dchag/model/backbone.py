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
        init_method_std=0.02,
        cuda_graph_scope=[],  # megatron-core 0.16's default "full" is deprecated (a warning per model): its replacement
    )
    if cfg.recompute_activations:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    from dchag.device import runs_on_cpu
    if runs_on_cpu():  # the run's device decides, not whether a GPU exists
        from megatron_patches.cpu import cpu_transformer_config_overrides
        kwargs.update(cpu_transformer_config_overrides())
    # --use-cpu-initialization (default on, CPU and GPU): full master weights drawn from the global
    # RNG on the host, then sliced, so the initial model is the same on every T; off (GPU only),
    # each rank draws its own shard on its GPU (faster start-up, weights depend on T). README.
    if cfg.use_cpu_initialization is False and runs_on_cpu():
        from dchag.parallel.partition import LayoutError
        raise LayoutError("--no-use-cpu-initialization is a GPU option (each rank draws its shard on its GPU); "
                          "a CPU run always initializes on the host: drop the flag.")
    kwargs["use_cpu_initialization"] = True if cfg.use_cpu_initialization is None else cfg.use_cpu_initialization
    return TransformerConfig(**kwargs)


def without_sequence_parallel(config):
    """The same config for TP layers that sit outside the sequence-parallel region."""
    return dataclasses.replace(config, sequence_parallel=False)


def no_mask_layer_spec(attention_backend: str = "unfused", transformer_impl: str = "local"):
    """megatron's GPT layer spec with the causal mask replaced by no mask (a ViT). ``local``:
    megatron's local spec, its core attention per ``--attention-backend`` (``unfused``:
    ``DotProductAttention``; ``sdpa``: ``SDPADotProductAttention``). ``transformer_engine``:
    megatron's TE spec (TE picks its fused attention kernel)."""
    from megatron.core.transformer.enums import AttnMaskType
    from dchag.model.attention import resolve_attention_backend
    backend = resolve_attention_backend(attention_backend)
    if transformer_impl == "transformer_engine":
        from dchag.model.te import te_layer_spec
        spec = te_layer_spec()
    elif transformer_impl == "local":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
        spec = copy.deepcopy(get_gpt_layer_local_spec())
        if backend == "sdpa":
            from dchag.model.core_attention import SDPADotProductAttention
            spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    else:
        raise ValueError(f"--transformer-impl must be 'local' or 'transformer_engine', got {transformer_impl!r}.")
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def build_backbone(config, attention_backend: str = "unfused", transformer_impl: str = "local"):
    from megatron.core.transformer.transformer_block import TransformerBlock
    return TransformerBlock(config, no_mask_layer_spec(attention_backend, transformer_impl), post_layer_norm=True,
                            pre_process=True, post_process=True)


def mark_linear_weight_matrices(module: nn.Module) -> None:
    """Tag the weights of megatron's TP linear layers (and torch's) as weight matrices, for
    weight decay; their biases and the norms stay untagged."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    for m in module.modules():
        if isinstance(m, (nn.Linear, ColumnParallelLinear, RowParallelLinear)):
            mark_weight_matrix(m.weight)
