"""The backbone's core attention through ``torch.nn.functional.scaled_dot_product_attention``.

A drop-in ``core_attention`` for megatron-core 0.16's ``SelfAttention`` (same constructor and
forward as the local ``DotProductAttention``): query [sq, b, np, hn], key/value [sk, b, ng, hn]
-> context [sq, b, np * hn]. What it keeps from ``DotProductAttention``:

* scale: ``softmax_scale`` if the config gives one, else 1/sqrt(hn) (megatron's
  ``apply_query_key_layer_scaling`` divides the scores by the layer number and multiplies them
  back inside the softmax: the same net scale, so it is ignored here);
* masks: ``no_mask`` (the ViT), ``causal`` without a mask tensor (``is_causal``), or a boolean
  mask tensor with megatron's convention (True = masked out);
* grouped-query attention: key/value heads repeated to the query heads;
* dropout on the attention probabilities, rate ``attention_dropout``, in training only, drawn
  inside megatron's model-parallel RNG tracker (``get_cuda_rng_tracker().fork()``) unless
  sequence parallel is on, exactly where ``DotProductAttention`` draws it: each TP rank holds
  different heads, so their masks must differ, and activation recompute replays them. The masks
  themselves differ from ``torch.nn.Dropout``'s (SDPA samples its own), not their law.

Not supported (a clear error at construction): context parallelism, ``softmax_type`` other than
``vanilla``, sliding-window attention, attention bias, packed sequences.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron.core import tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.utils import is_layer_window_attention


class SDPADotProductAttention(MegatronModule):
    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str,
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 cp_comm_type: str | None = None, pg_collection=None):
        super().__init__(config=config)
        unsupported = []
        if config.context_parallel_size != 1:
            unsupported.append("context parallelism")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            unsupported.append(f"softmax_type={config.softmax_type!r}")
        if is_layer_window_attention(config.window_size, config.window_attn_skip_freq, layer_number):
            unsupported.append("sliding-window attention")
        if unsupported:
            raise ValueError(f"--attention-backend sdpa does not support {', '.join(unsupported)}: "
                             "use --attention-backend unfused.")
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.layer_number, self.attn_mask_type = max(1, layer_number), attn_mask_type
        self.heads_per_partition = config.num_attention_heads // tp
        self.groups_per_partition = config.num_query_groups // tp
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if attention_bias is not None or packed_seq_params is not None:
            raise ValueError("--attention-backend sdpa: attention bias and packed sequences are not supported.")
        repeat = self.heads_per_partition // self.groups_per_partition
        if repeat > 1:
            key, value = key.repeat_interleave(repeat, dim=2), value.repeat_interleave(repeat, dim=2)
        sq, b, nh, hn = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        mask, causal = None, False
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attends
        elif mask_type == AttnMaskType.causal:
            causal = True
        dropout_p = self.dropout_p if self.training else 0.0

        def sdpa():
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=causal, scale=self.softmax_scale)

        if dropout_p > 0.0 and not self.config.sequence_parallel:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                context = sdpa()
        else:
            context = sdpa()
        return context.permute(2, 0, 1, 3).reshape(sq, b, nh * hn)  # [sq, b, hp]

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        return {}  # no parameters (vanilla softmax)
