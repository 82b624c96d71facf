"""DChagViT: one model class for every aggregation and every layout.

    images [B, c_r, H, W]        this rank's channels only (c_r = C/P, or C for P = 1); in a blend of
                                 data sources, its slots of the step's source (dchag/parallel/sources.py)
      tokenizer                  [B, c_r, L, D]       per-channel patch embedding + channel embedding
      partial aggregation        [B, G/P, L, D]       local to the rank (identity for flat)
        (--dchag-channel-chunk K: both streamed K channels at a time, dchag/model/streaming.py)
      gather over channel group  [B, G, L, D]         the one D-CHAG collective
      final aggregation (TP)     [B, L, D]            learned-query cross-attention over G tokens
      (MAE: masked positions -> mask token)
      + position embedding       [1, L, D]            added after masking: a masked token knows where it is
      (+ lead-time embedding for forecast)
      backbone (TP, SP)          [L, B, D]            megatron TransformerBlock, final norm
      head                       MAE: [B, c_r, H, W]  (sharded by channel)
                                 dense: [B, K, H, W]  (replicated; forecast V variables, regress K
                                                      targets, segment K class logits)

Which head and which conditioning a task gets is the task table ``TASK_MODELS`` of
dchag/model/config.py; the model knows nothing else about tasks. The head is always ``self.head``,
the conditioning ``self.mask_token`` (MAE) or ``self.lead_time_embed`` (forecast).

The position embedding is a *learned* parameter initialized to the fixed 2-D sine-cosine
embedding (as ClimaX does; MAE keeps it fixed); like the mask token, it takes no weight decay.

The model knows shapes and ranks (a ``ParallelLayout``); the collectives it needs are the
named functions of ``dchag.parallel.comm`` and megatron's ``tensor_parallel`` mappings.
"""

from __future__ import annotations

import torch
from torch import nn

from dchag.model.aggregation import FinalAggregation, build_partial_aggregation
from dchag.model.attention import resolve_attention_backend
from dchag.model.bank import Bank
from dchag.model.backbone import (build_backbone, mark_linear_weight_matrices, transformer_config,
                                  without_sequence_parallel)
from dchag.model.config import DChagConfig
from dchag.model.group_norm import GroupTokenNorm
from dchag.model.heads import ChannelReconstructionHead, DenseHead, sincos_2d
from dchag.model.init import init_rows_
from dchag.model.query_reduce import build_query_partial_aggregation
from dchag.model.streaming import streamed_partial_aggregation
from dchag.model.tokenizer import ChannelTokenizer
from dchag.parallel.comm import gather_from_channel_parallel_region
from dchag.parallel.grads import allreduce_sequence_parallel_grads
from dchag.parallel.layout import ParallelLayout


class DChagViT(nn.Module):
    def __init__(self, cfg: DChagConfig, layout: ParallelLayout | None = None):
        super().__init__()
        layout = layout or ParallelLayout.current()
        T, P = layout.tensor_parallel_size, layout.channel_parallel_size
        cfg.validate_layout(T, P)
        self.cfg, self.layout = cfg, layout
        rank = layout.channel_parallel_rank
        # Which union channels each rank tokenizes per data source and which rows it holds
        # (dchag/parallel/sources.py); one source: the partition's channels, nothing borrowed.
        self.source_layout = cfg.source_layout(P)
        self.bank = Bank.of(self.source_layout, rank)
        self.partition = cfg.partition(P) if cfg.sources is None else None
        self.channels = self.bank.ids  # the rows of per-channel weights this rank holds (one source: its input)
        owner = layout.owns_channel_stage
        D, seed = cfg.hidden_size, cfg.init_seed
        self.config = transformer_config(cfg, T)
        self.sequence_parallel = self.config.sequence_parallel

        # Channel stage: this rank's channels and groups only.
        wavelengths, wavelength_slots = self._wavelengths(rank)
        self.tokenizer = ChannelTokenizer(self.channels, cfg.num_channels, D, cfg.patch_dim, seed, owner, wavelengths,
                                          self.bank.plans, wavelength_slots)
        attention = resolve_attention_backend(cfg.attention_backend)  # sdpa | unfused
        # --dchag-channel-chunk K: per source, the same number of chunks on every channel rank (dchag/model/streaming.py)
        self.stream_chunks = tuple(cfg.channel_chunk and self.source_layout.partition(s).stream_chunks(cfg.channel_chunk)
                                   for s in range(self.source_layout.num_sources))
        sources = None if cfg.sources is None else self.source_layout
        if cfg.aggregation == "cross" and cfg.cross_projections == "none":  # D-CHAG-C without projections
            self.partial = build_query_partial_aggregation(self.partition, rank, cfg.tree_levels, D,
                                                           cfg.num_attention_heads, owner, attention, sources)
        else:
            self.partial = build_partial_aggregation(cfg.aggregation, self.partition, rank, cfg.tree_levels, D,
                                                     cfg.num_attention_heads, seed, owner, attention, sources)
        if cfg.group_norm == "layernorm":  # --dchag-group-norm (dchag/model/group_norm.py)
            groups = self.source_layout.partition(0)  # every source has the same G groups on a rank
            self.group_norm = GroupTokenNorm(groups.rank_groups(rank), groups.num_groups, D, owner,
                                             cfg.layernorm_epsilon)
        self.final = FinalAggregation(without_sequence_parallel(self.config), D, cfg.num_attention_heads,
                                      T, attention)

        self.pos_embed = nn.Parameter(sincos_2d(D, cfg.grid)[None])  # [1, L, D]
        spec = cfg.task_model
        # Built in this order (conditioning, backbone, head): the lead-time embedding and the dense
        # head draw their initial values from the global RNG.
        if spec.conditioning == "mask_token":
            self.mask_token = nn.Parameter(init_rows_(torch.empty(1, D), range(1), seed, "mask_token", std=0.02))
        elif spec.conditioning == "lead_time":
            self.lead_time_embed = nn.Linear(1, D)
        self.backbone = build_backbone(self.config, attention, cfg.transformer_impl)
        if spec.head == "channels":
            self.head = ChannelReconstructionHead(self.channels, cfg.num_channels, D, cfg.patch_dim, cfg.grid,
                                                  seed, owner, self.bank.plans)
        else:
            self.head = DenseHead(D, cfg.dense_planes, cfg.patch_dim, cfg.grid)
        from dchag.model.lora import attach as attach_lora
        attach_lora(self, cfg, T, layout.tensor_parallel_rank)  # --lora-rank: adapters on the TP linears
        mark_linear_weight_matrices(self)
        if cfg.bf16:
            # In place (``.data``), which is what Module.to does for real tensors; Module.to would
            # swap fake tensors (FakeTensorMode holds weakrefs to them) and fail (dchag.sim).
            for t in list(self.parameters()) + list(self.buffers()):
                if t.is_floating_point():
                    t.data = t.data.to(torch.bfloat16)
        if self.sequence_parallel:
            allreduce_sequence_parallel_grads(self.backbone)

    def _wavelengths(self, rank: int) -> tuple:
        """--channel-embedding wavelength: (the wavelengths of the tokenizer's fixed rows, per source
        the row of each of the rank's slots); one source: (its channels' wavelengths, None)."""
        cfg, lay = self.cfg, self.source_layout
        if cfg.channel_embedding != "wavelength":
            return None, None
        if cfg.sources is None:
            return [cfg.wavelengths[c] for c in self.channels], None
        slots = [lay.rank_slots(s, rank) for s in range(lay.num_sources)]
        ids = sorted(set().union(*slots))
        row = {u: i for i, u in enumerate(ids)}
        return [cfg.wavelengths[u] for u in ids], tuple(tuple(row[u] for u in ids_s) for ids_s in slots)

    # ---- what a rank takes and gives, per data source (dchag/parallel/sources.py) ----------
    def input_channels(self, source: int = 0) -> range | tuple[int, ...]:
        """The channels this rank's input holds for data ``source``: positions in the source's own
        channel order, one per slot (a channel repeats where a source has fewer channels than
        groups). One source: ``self.channels``."""
        if self.cfg.sources is None:
            self.source_layout._check_source(source)
            return self.channels
        return self.source_layout.rank_source_channels(source, self.layout.channel_parallel_rank)

    def slot_ids(self, source: int = 0) -> tuple[int, ...]:
        """The union ids of this rank's slots for data ``source`` (the rows of the MAE output)."""
        return self.source_layout.rank_slots(source, self.layout.channel_parallel_rank)

    def scored_slots(self, source: int = 0) -> tuple[bool, ...]:
        """Per slot of this rank for data ``source``: whether a loss counts it (its channel's
        first slot), so a repeated channel is scored once."""
        return self.source_layout.scored_slots(source, self.layout.channel_parallel_rank)

    def task_parameter_names(self) -> list[str]:
        """The task's head and its input conditioning (MAE's mask token, forecast's lead-time
        embedding): what a linear probe trains (--freeze-encoder); the rest is the encoder."""
        return [n for n, _ in self.named_parameters() if n.split(".")[0] in ("head", "mask_token", "lead_time_embed")]

    def aggregate_channels(self, images: torch.Tensor, source: int = 0) -> torch.Tensor:
        """The channel stage: [B, c_r, H, W] (the rank's slots of data ``source``) -> [B, L, D]."""
        self.source_layout._check_source(source)
        if self.stream_chunks[source]:  # <= K channels at a time, recomputed in backward
            local_groups = streamed_partial_aggregation(images, self.tokenizer, self.partial,
                                                        self.stream_chunks[source], source)
        else:
            tokens = self.tokenizer(images, source=source)  # [B, c_r, L, D]
            local_groups = self.partial(tokens, source=source)  # [B, G/P, L, D]
        if hasattr(self, "group_norm"):
            local_groups = self.group_norm(local_groups)
        all_groups = gather_from_channel_parallel_region(local_groups, dim=1)  # [B, G, L, D]
        return self.final(all_groups)  # [B, L, D]

    def forward(self, images: torch.Tensor, patch_mask: torch.Tensor | None = None,
                lead_time: torch.Tensor | None = None, source: int = 0) -> torch.Tensor:
        """images [B, c_r, H, W]: this rank's slots of data ``source`` (``input_channels(source)``; one
        source: its channels); patch_mask [B, L] bool (True = masked, MAE); lead_time [B] (forecast).
        Every rank of the run takes the same source at a step (the blend is per global batch)."""
        from megatron.core import tensor_parallel
        # [B, L, D]; source 0 (one source): the one-argument call, as before the blends (tests replace the method)
        x = self.aggregate_channels(images, source) if source else self.aggregate_channels(images)
        if patch_mask is not None:
            x = torch.where(patch_mask[..., None], self.mask_token.to(x.dtype), x)
        x = x + self.pos_embed  # after masking: every mask token carries its position (MAE)
        if lead_time is not None:
            x = x + self.lead_time_embed(lead_time.to(x.dtype).reshape(-1, 1))[:, None, :]
        x = x.transpose(0, 1).contiguous()  # [L, B, D]: megatron's sequence-first layout
        if self.sequence_parallel:
            x = tensor_parallel.scatter_to_sequence_parallel_region(x)  # [L/T, B, D]
        x = self.backbone(x, attention_mask=None)
        if self.sequence_parallel:
            # The heads' gradient is identical on every TP rank, so backward is a split.
            x = tensor_parallel.gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)
        x = x.transpose(0, 1)
        return self.head(x, source) if isinstance(self.head, ChannelReconstructionHead) else self.head(x)
