"""The model's hyperparameters (layout-free: the same config runs on any T, P)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dchag.parallel.partition import ChannelPartition, LayoutError

AGGREGATIONS = ("flat", "linear", "cross")


@dataclass(frozen=True)
class TaskModel:
    """What the model builds for a task (everything else about a task lives in dchag/tasks)."""
    head: str  # "channels": per-channel reconstruction, channel-sharded | "dense": per-patch planes, replicated
    conditioning: str | None  # "mask_token" (MAE) | "lead_time" (forecast) | None
    planes: str | None = None  # a dense head's output count: "predicted_channels" | "num_outputs"


# The task table: the only task knowledge the model has (DChagConfig.dense_planes).
TASK_MODELS = {
    "mae": TaskModel(head="channels", conditioning="mask_token"),
    "forecast": TaskModel(head="dense", conditioning="lead_time", planes="predicted_channels"),
    "regress": TaskModel(head="dense", conditioning=None, planes="num_outputs"),  # K target maps
    "segment": TaskModel(head="dense", conditioning=None, planes="num_outputs"),  # K class logits
}
TASKS = tuple(TASK_MODELS)
CHANNEL_EMBEDDINGS = ("learned", "wavelength")
CROSS_PROJECTIONS = ("per-group", "none")
GROUP_NORMS = ("none", "layernorm")
# --dchag-channel-chunk when not given (training, planner, simulation): streamed D-CHAG-L (faster and
# 3-7x less channel-stage memory at every C measured), unstreamed D-CHAG-C (streaming costs it up to
# ~2x channel-stage time); docs/BENCHMARKS.md section 8
DEFAULT_CHANNEL_CHUNK = {"linear": 64, "cross": 0, "flat": 0}


def default_channel_chunk(aggregation: str, given: int | None = None) -> int:
    """The streamed channel stage's K: ``given``, or the aggregation's default."""
    return DEFAULT_CHANNEL_CHUNK[aggregation] if given is None else given


@dataclass(frozen=True)
class DChagConfig:
    num_channels: int  # C
    img_h: int
    img_w: int
    patch_dim: int  # p
    hidden_size: int = 64  # D
    num_layers: int = 2
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4 D
    aggregation: str = "linear"  # flat | linear (D-CHAG-L) | cross (D-CHAG-C)
    groups: int = 1  # G, ignored by flat (every channel is its own group)
    tree_levels: int = 1  # k: levels of the partial (in-group) reduction
    # cross: per-group key/value/output projections (the paper's D-CHAG-C), or none (the query attends
    # over the tokens themselves; dchag/model/query_reduce.py)
    cross_projections: str = "per-group"
    group_norm: str = "none"  # none | layernorm: a LayerNorm per group token after the partial stage (group_norm.py)
    channel_chunk: int = 0  # K: stream the channel stage K channels at a time (0 = off; dchag/model/streaming.py)
    task: str = "mae"
    out_channels: tuple[int, ...] | None = None  # forecast: predicted channels (default: all)
    num_outputs: int | None = None  # regress: K target maps; segment: K classes
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    recompute_activations: bool = False
    sequence_parallel: bool = False
    bf16: bool = False
    init_seed: int = 1234
    layernorm_epsilon: float = 1e-5
    # How, not what: kernels and initialization placement (dchag/model/attention.py, backbone.py).
    attention_backend: str = "auto"  # auto (= sdpa) | sdpa | unfused
    transformer_impl: str = "local"  # local | transformer_engine (only where TE is installed)
    use_cpu_initialization: bool | None = None  # None: on (README, "GPU")
    # A channel is an identity, not a position (DESIGN.md section 2): each channel's name and wavelength
    # (nm; None where it has none), from the data. Per-channel weights belong to it (dchag/transfer).
    channel_names: tuple[str, ...] | None = None
    wavelengths: tuple[float | None, ...] | None = None
    channel_embedding: str = "learned"  # learned | wavelength (+ a fixed sin-cos of the wavelength, tokenizer.py)
    # A blend of data sources (--data-path W1 P1 W2 P2 ...): the channels above are the union of the
    # sources' channel identities, and each source is the tuple of union ids of its channels, in its
    # order (dchag/parallel/sources.py). None: one source holding every channel in order.
    sources: tuple[tuple[int, ...], ...] | None = None
    source_names: tuple[str, ...] | None = None  # per source, its name in logs and TensorBoard
    # LoRA (--lora-*; dchag/model/lora.py): adapters on the backbone's (and the final aggregation's) TP linears.
    lora_rank: int = 0  # 0: none
    lora_alpha: float | None = None  # None: the rank (scale 1)
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] | None = None  # None: qkv, proj, fc1, fc2
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.aggregation not in AGGREGATIONS:
            raise LayoutError(f"--dchag-aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}.")
        if self.attention_backend not in ("auto", "sdpa", "unfused"):
            raise LayoutError(f"--attention-backend must be auto, sdpa or unfused, got {self.attention_backend!r}.")
        if self.transformer_impl not in ("local", "transformer_engine"):
            raise LayoutError(f"--transformer-impl must be local or transformer_engine, got {self.transformer_impl!r}.")
        if self.transformer_impl == "transformer_engine":
            from dchag.model.te import require_transformer_engine
            require_transformer_engine()
        self._check_channel_identity()
        if self.task not in TASKS:
            raise LayoutError(f"--task must be one of {TASKS}, got {self.task!r}.")
        if self.task_model.planes == "num_outputs" and not (self.num_outputs or 0) >= 1:
            raise LayoutError(f"--task {self.task} needs the number of its output maps (num_outputs >= 1), got "
                              f"{self.num_outputs!r}: give --target-path (regress) or --num-classes (segment).")
        for name, size in (("--img-h", self.img_h), ("--img-w", self.img_w)):
            if size % self.patch_dim != 0:
                raise LayoutError(
                    f"{name} {size} is not divisible by --patch-dim {self.patch_dim}: choose a patch "
                    f"size that divides both image sides (or crop/pad the image to a multiple of it).")
        if self.hidden_size % self.num_attention_heads != 0:
            raise LayoutError(f"--hidden-size {self.hidden_size} must be divisible by "
                              f"--num-attention-heads {self.num_attention_heads}.")
        if self.cross_projections not in CROSS_PROJECTIONS:
            raise LayoutError(f"--dchag-cross-projections must be one of {CROSS_PROJECTIONS}, got "
                              f"{self.cross_projections!r}.")
        if self.cross_projections != "per-group" and self.aggregation != "cross":
            raise LayoutError(f"--dchag-cross-projections {self.cross_projections} applies to --dchag-aggregation cross, "
                              f"not {self.aggregation}.")
        if self.group_norm not in GROUP_NORMS:
            raise LayoutError(f"--dchag-group-norm must be one of {GROUP_NORMS}, got {self.group_norm!r}.")
        if self.group_norm != "none" and self.aggregation == "flat":
            raise LayoutError("--dchag-group-norm normalizes D-CHAG's group tokens; flat has none: use "
                              "--dchag-aggregation linear or cross, or --dchag-group-norm none.")
        if self.tree_levels < 1:
            raise LayoutError(f"--dchag-tree-levels must be >= 1, got {self.tree_levels}.")
        if self.aggregation == "flat" and self.tree_levels != 1:
            raise LayoutError("--dchag-tree-levels applies to linear/cross aggregation, not flat.")
        if self.channel_chunk < 0:
            raise LayoutError(f"--dchag-channel-chunk must be >= 0 (0 = off), got {self.channel_chunk}.")
        if self.aggregation == "flat" and self.channel_chunk:
            raise LayoutError("--dchag-channel-chunk streams the partial aggregation, which flat does not have: "
                              "use --dchag-aggregation linear or cross, or --dchag-channel-chunk 0.")
        if self.sources is not None:
            self._check_sources()
            return
        smallest_group = self.num_channels // self.num_groups
        if 2 ** (self.tree_levels - 1) > smallest_group:
            raise LayoutError(
                f"--dchag-tree-levels {self.tree_levels} splits each group into {2 ** (self.tree_levels - 1)} "
                f"sub-groups, but the smallest group has {smallest_group} channel(s) "
                f"(C={self.num_channels}, G={self.num_groups}); use fewer levels or fewer groups.")
        ChannelPartition(self.num_channels, self.num_groups)  # validates G against C

    def _check_sources(self):
        object.__setattr__(self, "sources", tuple(tuple(int(u) for u in ids) for ids in self.sources))
        if self.source_names is not None:
            object.__setattr__(self, "source_names", tuple(str(n) for n in self.source_names))
            if len(self.source_names) != len(self.sources):
                raise LayoutError(f"{len(self.source_names)} source names for {len(self.sources)} data sources.")
        self.source_layout(1)  # every source fits G (slots repeat a source with fewer channels than G)

    def source_layout(self, channel_parallel_size: int = 1):
        """Which union channels each channel-parallel rank tokenizes per source, and holds
        (dchag/parallel/sources.py); with one source, ``partition(P)``'s channels."""
        from dchag.parallel.sources import SourceLayout
        return SourceLayout(self.num_channels, self.sources, self.groups, channel_parallel_size, self.aggregation,
                            self.tree_levels)

    def _check_channel_identity(self):
        # Lists (from JSON) become tuples; a non-finite wavelength is no wavelength.
        if self.channel_names is not None:
            object.__setattr__(self, "channel_names", tuple(str(n) for n in self.channel_names))
        if self.wavelengths is not None:
            object.__setattr__(self, "wavelengths", tuple(
                float(w) if w is not None and math.isfinite(float(w)) else None for w in self.wavelengths))
        for what, values in (("channel names", self.channel_names), ("wavelengths", self.wavelengths)):
            if values is not None and len(values) != self.num_channels:
                raise LayoutError(f"{len(values)} {what} for {self.num_channels} channels: give one per channel.")
        if self.channel_embedding not in CHANNEL_EMBEDDINGS:
            raise LayoutError(f"--channel-embedding must be one of {CHANNEL_EMBEDDINGS}, got {self.channel_embedding!r}.")
        if self.channel_embedding == "wavelength" and not any(w is not None for w in self.wavelengths or ()):
            raise LayoutError("--channel-embedding wavelength needs the channels' wavelengths, and the data has none "
                              "(ENVI 'wavelength', an HDF5/Zarr 'wavelengths' attribute, a wavelength coordinate); "
                              "use --channel-embedding learned.")

    @property
    def num_groups(self) -> int:
        """G: tokens per position after partial aggregation (C for flat)."""
        return self.num_channels if self.aggregation == "flat" else self.groups

    @property
    def num_patches(self) -> int:  # L
        return (self.img_h // self.patch_dim) * (self.img_w // self.patch_dim)

    @property
    def grid(self) -> tuple[int, int]:
        return self.img_h // self.patch_dim, self.img_w // self.patch_dim

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def predicted_channels(self) -> tuple[int, ...]:
        return self.out_channels if self.out_channels is not None else tuple(range(self.num_channels))

    @property
    def task_model(self) -> TaskModel:
        return TASK_MODELS[self.task]

    @property
    def dense_planes(self) -> int:
        """K, the output planes of a dense head: forecast's predicted channels, else num_outputs."""
        if self.task_model.planes == "predicted_channels":
            return len(self.predicted_channels)
        return int(self.num_outputs)

    def partition(self, channel_parallel_size: int = 1) -> ChannelPartition:
        return ChannelPartition(self.num_channels, self.num_groups, channel_parallel_size)

    def validate_layout(self, tensor_parallel_size: int, channel_parallel_size: int) -> None:
        """Errors that depend on the layout, raised before any weight is built."""
        if self.num_attention_heads % tensor_parallel_size != 0:
            raise LayoutError(
                f"--num-attention-heads {self.num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tensor_parallel_size}: attention heads are split over TP ranks.")
        if self.ffn_size % tensor_parallel_size != 0:
            raise LayoutError(f"--ffn-hidden-size {self.ffn_size} is not divisible by "
                              f"--tensor-model-parallel-size {tensor_parallel_size}.")
        if tensor_parallel_size % channel_parallel_size != 0:
            raise LayoutError(
                f"--channel-parallel-size {channel_parallel_size} must divide "
                f"--tensor-model-parallel-size {tensor_parallel_size}.")
        if self.sequence_parallel and self.num_patches % tensor_parallel_size != 0:
            raise LayoutError(
                f"--sequence-parallel splits the {self.num_patches} patches over {tensor_parallel_size} "
                "TP ranks: the patch count must be divisible by T.")
        if self.sources is not None:
            self.source_layout(channel_parallel_size)  # P | G (flat: P | every source's C)
        else:
            self.partition(channel_parallel_size)  # P | G
