"""What a benchmark sweep runs: the model shape, the methods, the layouts.

Methods (``--methods``):

    tp        TP alone, the baseline (DESIGN.md section 1): flat aggregation, one cross-attention
              over all C channel tokens with its heads split over T ranks; every rank tokenizes
              all C channels (P = 1).
    dchag-l   D-CHAG-L: linear partial aggregation to G groups, P = T.
    dchag-c   D-CHAG-C: cross-attention partial aggregation to G groups, P = T.
    dchag-l-stream, dchag-c-stream
              the same, with the channel stage streamed over chunks of at most K channels
              (``--dchag-channel-chunk K``, dchag/model/streaming.py).

The default model is small enough for a 2-core CPU box but keeps the channel stage as heavy
relative to the backbone as at paper scale: under TP alone at C = 512 the channel stage (tokens,
aggregation, and the per-channel MAE head) holds most of a rank's activations (see
docs/BENCHMARKS.md for the share next to a paper-scale model's, from the planner).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from dchag.model.config import DChagConfig


@dataclass(frozen=True)
class Method:
    name: str
    label: str
    aggregation: str
    channel_parallel: str  # "1" (TP alone) or "T" (D-CHAG: P = T)
    streamed: bool = False  # --dchag-channel-chunk (BenchModel.channel_chunk channels at a time)

    def channel_parallel_size(self, T: int) -> int:
        return 1 if self.channel_parallel == "1" else T


METHODS = {
    "tp": Method("tp", "TP alone (flat)", "flat", "1"),
    "dchag-l": Method("dchag-l", "D-CHAG-L (linear)", "linear", "T"),
    "dchag-c": Method("dchag-c", "D-CHAG-C (cross)", "cross", "T"),
    "dchag-l-stream": Method("dchag-l-stream", "D-CHAG-L streamed", "linear", "T", streamed=True),
    "dchag-c-stream": Method("dchag-c-stream", "D-CHAG-C streamed", "cross", "T", streamed=True),
}
ALIASES = {"flat": "tp", "baseline": "tp", "linear": "dchag-l", "cross": "dchag-c",
           "linear-stream": "dchag-l-stream", "cross-stream": "dchag-c-stream"}


def parse_methods(text: str) -> tuple[str, ...]:
    out = []
    for item in filter(None, (s.strip().lower() for s in text.split(","))):
        name = ALIASES.get(item, item)
        if name not in METHODS:
            raise ValueError(f"unknown method {item!r}; choose from {', '.join(METHODS)} "
                             f"(aliases: {', '.join(ALIASES)}).")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError("--methods is empty")
    return tuple(out)


@dataclass(frozen=True)
class BenchModel:
    """The model shape shared by all methods of a sweep (only the aggregation differs)."""
    img_h: int = 32
    img_w: int = 32
    patch_dim: int = 4
    hidden_size: int = 128
    num_layers: int = 24
    num_attention_heads: int = 4
    ffn_hidden_size: int = 512
    groups: int = 8  # G of D-CHAG
    tree_levels: int = 1
    micro_batch_size: int = 2
    mask_ratio: float = 0.5
    sequence_parallel: bool = False
    recompute_activations: bool = False
    channel_chunk: int = 64  # K of the streamed methods (pretrain_dchag.py's default for linear)

    def dchag_config(self, num_channels: int, method: Method) -> DChagConfig:
        aggregation = method.aggregation
        return DChagConfig(
            channel_chunk=self.channel_chunk if method.streamed else 0,
            num_channels=num_channels, img_h=self.img_h, img_w=self.img_w, patch_dim=self.patch_dim,
            hidden_size=self.hidden_size, num_layers=self.num_layers,
            num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
            aggregation=aggregation, groups=self.groups if aggregation != "flat" else 1,
            tree_levels=self.tree_levels if aggregation != "flat" else 1, task="mae",
            sequence_parallel=self.sequence_parallel, recompute_activations=self.recompute_activations,
            # the explicit-softmax attention the planner's memory model describes (scores saved)
            attention_backend="unfused")


@dataclass(frozen=True)
class BenchConfig:
    model: BenchModel = field(default_factory=BenchModel)
    channels: tuple[int, ...] = (64, 256, 512)
    tensor_parallel: tuple[int, ...] = (1, 2, 4)
    methods: tuple[str, ...] = ("tp", "dchag-l", "dchag-c")
    warmup: int = 2
    steps: int = 5
    rounds: int = 2  # every case runs this many times, in alternating order; time = best round's median
    lr: float = 1e-4
    seed: int = 1234
    whole_step: bool = True  # also run forward + backward + optimizer step of the whole model

    def cases(self, T: int) -> list[tuple[int, str]]:
        return [(C, m) for C in self.channels for m in self.methods]

    def validate(self) -> None:
        """Fail before spawning anything if a case cannot be built."""
        for T in self.tensor_parallel:
            for C, m in self.cases(T):
                method = METHODS[m]
                cfg = self.model.dchag_config(C, method)
                cfg.validate_layout(T, method.channel_parallel_size(T))
        if self.steps < 1 or self.warmup < 0 or self.rounds < 1:
            raise ValueError("--steps and --rounds must be >= 1 and --warmup >= 0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BenchConfig":
        d = dict(d)
        d["model"] = BenchModel(**d["model"])
        for key in ("channels", "tensor_parallel", "methods"):
            d[key] = tuple(d[key])
        return cls(**d)
