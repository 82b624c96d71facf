"""Planner inputs: the model (layout-free) and the layout, with clear errors for impossible ones."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dchag.parallel.partition import LayoutError

PRECISIONS = {"fp32": 4, "bf16": 2}
AGGREGATIONS = ("flat", "linear", "cross")
ATTENTION_BACKENDS = ("sdpa", "unfused")  # --attention-backend (auto = sdpa)


class PlanError(LayoutError):
    """An impossible or inconsistent planner input; the message names the problem and the fix."""


@dataclass(frozen=True)
class ModelSpec:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_channels: int
    img_h: int
    img_w: int
    patch_dim: int
    ffn_hidden_size: int | None = None  # default 4 D
    aggregation: str = "linear"
    groups: int = 8  # G (ignored by flat: every channel is its own group)
    tree_levels: int = 1
    channel_chunk: int = 0  # K of the streamed channel stage (0 = off)
    task: str = "mae"
    out_channels: int | None = None  # forecast: predicted variables (default: all)
    attention_backend: str = "sdpa"  # the kernel of every attention (training's default: auto = sdpa)
    # A blend of data sources (--data-path W1 P1 ...): per source its channel count, the channels all
    # distinct (the parameters' worst case): num_channels is their union, the sum. Activations follow
    # the largest source's slots per rank, per-channel parameters the union's rows a rank holds
    # (dchag/parallel/sources.py).
    source_channels: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.attention_backend == "auto":
            object.__setattr__(self, "attention_backend", "sdpa")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise PlanError(f"attention backend must be auto, sdpa or unfused, got {self.attention_backend!r}.")
        for name in ("num_layers", "hidden_size", "num_attention_heads", "num_channels", "img_h", "img_w",
                     "patch_dim", "tree_levels"):
            if int(getattr(self, name)) < 1:
                raise PlanError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.aggregation not in AGGREGATIONS:
            raise PlanError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        if self.task not in ("mae", "forecast"):
            raise PlanError(f"task must be mae or forecast, got {self.task!r}.")
        if self.img_h % self.patch_dim or self.img_w % self.patch_dim:
            raise PlanError(f"image {self.img_h}x{self.img_w} is not divisible by patch {self.patch_dim}: "
                            "choose a patch size that divides both image sides.")
        if self.hidden_size % self.num_attention_heads:
            raise PlanError(f"hidden size {self.hidden_size} is not divisible by {self.num_attention_heads} heads.")
        if self.source_channels is not None:
            object.__setattr__(self, "source_channels", tuple(int(c) for c in self.source_channels))
            if min(self.source_channels, default=0) < 1 or sum(self.source_channels) != self.num_channels:
                raise PlanError(f"a blend of sources with {list(self.source_channels)} channels has "
                                f"{sum(self.source_channels)} distinct channels in all, not {self.num_channels}: give "
                                "every source at least one channel, and their sum as the channel count.")
            if self.aggregation == "flat" and self.tree_levels != 1:
                raise PlanError("tree levels apply to linear/cross aggregation, not flat.")
        elif self.aggregation != "flat":
            if not 1 <= self.groups <= self.num_channels:
                raise PlanError(f"groups G={self.groups} must be between 1 and the channel count "
                                f"{self.num_channels}: a group needs at least one channel.")
            if 2 ** (self.tree_levels - 1) > self.num_channels // self.groups:
                raise PlanError(f"tree levels {self.tree_levels} split each group into {2 ** (self.tree_levels - 1)} "
                                f"sub-groups but the smallest group has {self.num_channels // self.groups} channel(s); "
                                "use fewer levels or fewer groups.")
        elif self.tree_levels != 1:
            raise PlanError("tree levels apply to linear/cross aggregation, not flat.")
        if self.channel_chunk < 0 or (self.channel_chunk and self.aggregation == "flat"):
            raise PlanError(f"channel chunk {self.channel_chunk}: streaming needs linear or cross aggregation "
                            "and K >= 1 (0 = off).")

    # -- derived sizes
    @property
    def D(self) -> int:
        return self.hidden_size

    @property
    def F(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def C(self) -> int:
        return self.num_channels

    @property
    def G(self) -> int:
        """Tokens per position after the partial aggregation (C for flat; a blend: its largest source's C)."""
        if self.aggregation == "flat":
            return max(self.source_channels) if self.source_channels else self.num_channels
        return self.groups

    def source_layout(self, channel_parallel: int):
        """A blend's channel layout over P ranks (sources of distinct channels, in order); None for one source."""
        if self.source_channels is None:
            return None
        from dchag.parallel.sources import SourceLayout
        starts = [sum(self.source_channels[:s]) for s in range(len(self.source_channels))]
        sources = tuple(tuple(range(a, a + c)) for a, c in zip(starts, self.source_channels))
        try:
            return SourceLayout(self.num_channels, sources, self.groups, channel_parallel, self.aggregation,
                                self.tree_levels)
        except LayoutError as e:
            raise PlanError(str(e)) from None

    @property
    def L(self) -> int:
        return (self.img_h // self.patch_dim) * (self.img_w // self.patch_dim)

    @property
    def V(self) -> int:
        return self.out_channels or self.num_channels

    def with_(self, **kw) -> "ModelSpec":
        return replace(self, **kw)


@dataclass(frozen=True)
class LayoutSpec:
    tensor_parallel: int = 1  # T
    channel_parallel: int = 1  # P (P | T, P | G)
    data_parallel: int = 1  # DP
    zero_stage: int = 0
    precision: str = "fp32"  # fp32 | bf16 (mixed: bf16 params/activations, fp32 master + Adam)
    recompute: bool = False  # megatron full recompute of every transformer layer
    sequence_parallel: bool = False
    micro_batch_size: int = 1

    @property
    def world_size(self) -> int:
        return self.tensor_parallel * self.data_parallel

    @property
    def act_bytes(self) -> int:
        return PRECISIONS[self.precision]

    def with_(self, **kw) -> "LayoutSpec":
        return replace(self, **kw)


def validate(model: ModelSpec, layout: LayoutSpec) -> None:
    """Raise PlanError naming the fix for a layout the code cannot run."""
    T, P, DP = layout.tensor_parallel, layout.channel_parallel, layout.data_parallel
    for name, v in (("T (tensor parallel)", T), ("P (channel parallel)", P), ("DP (data parallel)", DP),
                    ("micro batch size", layout.micro_batch_size)):
        if v < 1:
            raise PlanError(f"{name} must be >= 1, got {v}.")
    if layout.precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {tuple(PRECISIONS)}, got {layout.precision!r}.")
    if layout.zero_stage not in (0, 1, 2, 3):
        raise PlanError(f"ZeRO stage must be 0, 1, 2 or 3, got {layout.zero_stage}.")
    if T % P:
        raise PlanError(f"P={P} does not divide T={T}: the channel-parallel group lies inside the TP group "
                        f"(P = T is the paper's layout); choose P among the divisors of T.")
    if model.G % P:
        raise PlanError(f"P={P} does not divide G={model.G} ({'C for flat' if model.aggregation == 'flat' else 'groups'}): "
                        f"every channel-parallel rank owns G/P groups; choose G as a multiple of P.")
    if model.num_attention_heads % T:
        raise PlanError(f"{model.num_attention_heads} attention heads are not divisible by T={T}: heads are split "
                        "over TP ranks.")
    if model.F % T:
        raise PlanError(f"FFN size {model.F} is not divisible by T={T}.")
    if layout.sequence_parallel and model.L % T:
        raise PlanError(f"sequence parallel splits the {model.L} patches over T={T} ranks: L must be divisible by T.")
