"""LoRA on megatron-core's tensor-parallel linears: ``y = W x + (alpha / r) B A dropout(x)``.

    --lora-rank R --lora-alpha A [--lora-dropout P] [--lora-targets qkv,proj,fc1,fc2[,final.kv,final.proj]]

Each targeted ``ColumnParallelLinear`` / ``RowParallelLinear`` keeps its weight (frozen by the
fine-tune, dchag/transfer/load.py) and gets a child module ``lora`` holding ``A`` [R, in] and ``B``
[out, R], so the base parameters keep their names (a pretrained model loads as it is) and the
adapters are ``<linear>.lora.A`` / ``.B``. B starts at zero: the first forward is the base model's.

Split with tensor parallelism like the base (T ranks; never a [out, in] product on any rank):

    ColumnParallel (W split on out)   A replicated [R, in]        B split on out [out/T, R]
        h = A dropout(x)   identical on every rank; enters the TP region through megatron's
        copy-to-region (backward: all-reduce of dL/dh, [tokens, R]), so A's gradient and the
        adapter's part of dL/dx are whole and equal on every rank; y_r = B_r h.
    RowParallel (W split on in)       A split on in [R, in/T]     B replicated [out, R]
        h = sum_r A_r dropout(x_r): megatron's reduce-from-region (forward all-reduce of [tokens, R],
        backward identity), then y = B h on every rank.

Under sequence parallelism a column-parallel input is the rank's L/T tokens: h is gathered from the
sequence-parallel region (backward: reduce-scatter) and A, which then sees only those tokens, is
tagged ``sequence_parallel`` (its gradient all-reduced over TP, dchag/parallel/grads.py); a
row-parallel output is reduce-scattered to the sequence region, and B is tagged likewise. The
collectives move [tokens, R] values, R << D.

The initialization is layout-free: A is drawn whole from a generator seeded by (seed, adapter name)
(uniform in +-1/sqrt(in), peft's default), then cut. Dropout (on the adapter's input only) is a
function of (seed, adapter, iteration, sample, token, feature), never of the layout: each sample's
mask is drawn whole from its own generator and cut to the rank's tokens and features. The training
loop names the micro-batch's samples and iteration with :func:`dropout_keys` around the forward and
backward (activation recompute draws the same masks again).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import zlib
from dataclasses import dataclass

import torch
from torch import nn

from dchag.model.init import mark_weight_matrix

# --lora-targets name -> the linears it adapts (module paths relative to the model; "*" a backbone layer)
TARGETS = {"qkv": "backbone.layers.*.self_attention.linear_qkv", "proj": "backbone.layers.*.self_attention.linear_proj",
           "fc1": "backbone.layers.*.mlp.linear_fc1", "fc2": "backbone.layers.*.mlp.linear_fc2",
           "final.kv": "final.kv", "final.proj": "final.proj"}
DEFAULT_TARGETS = ("qkv", "proj", "fc1", "fc2")
ADAPTER = "lora"  # the child module's name: parameters <linear>.lora.A, <linear>.lora.B


class LoRAError(ValueError):
    """LoRA flags that do not fit; the message names the flag and the fix."""


@dataclass(frozen=True)
class LoRASpec:
    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def describe(self) -> str:
        return (f"rank {self.rank}, alpha {self.alpha:g} (scale {self.scale:g}), dropout {self.dropout:g}, on "
                f"{', '.join(self.targets)}")


def spec_of(cfg) -> LoRASpec | None:
    """The LoRA of a model config (``lora_rank`` 0 or absent: none), checked."""
    rank = int(getattr(cfg, "lora_rank", 0) or 0)
    if rank == 0:
        return None
    alpha = getattr(cfg, "lora_alpha", None)
    targets = getattr(cfg, "lora_targets", None) or DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    spec = LoRASpec(rank, float(rank if alpha is None else alpha), float(getattr(cfg, "lora_dropout", 0.0) or 0.0),
                    tuple(targets))
    check(spec)
    return spec


def check(spec: LoRASpec) -> None:
    if spec.rank < 1:
        raise LoRAError(f"--lora-rank must be >= 1 (0 = no LoRA), got {spec.rank}.")
    if not spec.alpha > 0:
        raise LoRAError(f"--lora-alpha must be > 0 (the adapters' scale is alpha / rank), got {spec.alpha:g}.")
    if not 0.0 <= spec.dropout < 1.0:
        raise LoRAError(f"--lora-dropout must be in [0, 1), got {spec.dropout:g}.")
    unknown = [t for t in spec.targets if t not in TARGETS]
    if unknown or not spec.targets or len(set(spec.targets)) != len(spec.targets):
        raise LoRAError(f"--lora-targets {','.join(spec.targets)}: give a comma list of distinct names from "
                        f"{', '.join(TARGETS)} (the backbone's attention qkv/proj and MLP fc1/fc2, the final "
                        "aggregation's key-value and output projections).")


# ---- dropout keys ------------------------------------------------------------------------------

_KEYS: contextvars.ContextVar = contextvars.ContextVar("dchag_lora_dropout_keys", default=None)


@contextlib.contextmanager
def dropout_keys(sample_index: torch.Tensor, iteration: int):
    """Name the micro-batch's samples (``batch["index"]``, [B]) and the iteration for LoRA's dropout
    masks; wrap the forward and the backward (activation recompute draws again) in it."""
    token = _KEYS.set((tuple(int(i) for i in sample_index.reshape(-1).tolist()), int(iteration)))
    try:
        yield
    finally:
        _KEYS.reset(token)


def _mask_seed(seed: int, site: int, iteration: int, sample: int) -> int:
    return (seed * 1_000_003 + site * 7_919 + iteration * 104_729 + sample * 15_485_863) % (2**63 - 1)


def dropout_mask(shape: tuple[int, int, int], p: float, seed: int, site: int, device) -> torch.Tensor:
    """The keep-mask / (1 - p) for a whole input [S, B k, F] (k columns per sample: 1 in the backbone,
    the L positions in the final aggregation), each sample's [S, k, F] from its own generator."""
    keys = _KEYS.get()
    if keys is None:
        raise RuntimeError("--lora-dropout needs the micro-batch's sample indices: run the forward and backward "
                           "inside dchag.model.lora.dropout_keys(batch['index'], iteration) (the training loop does).")
    samples, iteration = keys
    S, columns, F = shape
    k = columns // len(samples)
    masks = []
    for sample in samples:
        gen = torch.Generator().manual_seed(_mask_seed(seed, site, iteration, sample))
        masks.append(torch.rand((S, k, F), generator=gen) >= p)
    return (torch.cat(masks, dim=1).to(device=device) / (1.0 - p))


# ---- the adapter ---------------------------------------------------------------------------------


class LoRAAdapter(nn.Module):
    """The adapter of one TP linear (module docstring): ``forward(x)`` is what it adds to the base's
    output, in the base output's layout."""

    def __init__(self, name: str, kind: str, in_features: int, out_features: int, spec: LoRASpec, seed: int,
                 tensor_parallel_size: int, tensor_parallel_rank: int, sequence_parallel: bool, dtype):
        super().__init__()
        assert kind in ("column", "row"), kind
        R, T = spec.rank, tensor_parallel_size
        self.name, self.kind, self.spec, self.seed = name, kind, spec, seed
        self.site = zlib.crc32(name.encode())
        self.tp_size, self.tp_rank, self.sequence_parallel = T, tensor_parallel_rank, sequence_parallel
        self.in_features, self.out_features = in_features, out_features  # whole (layout-free)
        a_full = _initial_a(R, in_features, seed, name)
        if kind == "column":
            self.A = nn.Parameter(a_full.to(dtype))
            self.B = nn.Parameter(torch.zeros(out_features // T, R, dtype=dtype))
            _mark_tensor_parallel(self.B, dim=0)
            split = self.A
        else:
            self.A = nn.Parameter(a_full.chunk(T, dim=1)[tensor_parallel_rank].clone().to(dtype))
            self.B = nn.Parameter(torch.zeros(out_features, R, dtype=dtype))
            _mark_tensor_parallel(self.A, dim=1)
            split = self.B
        if sequence_parallel and T > 1:  # sees only the rank's tokens: gradient all-reduced over TP
            split.sequence_parallel = True
        for p in (self.A, self.B):
            mark_weight_matrix(p)
            p.lora_adapter = True

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        p = self.spec.dropout
        if not self.training or p == 0.0:
            return x
        S, columns, F = x.shape
        full_S = S * self.tp_size if (self.kind == "column" and self.sequence_parallel) else S
        full_F = F * self.tp_size if self.kind == "row" else F
        mask = dropout_mask((full_S, columns, full_F), p, self.seed, self.site, x.device)
        if full_S != S:
            mask = mask[self.tp_rank * S:(self.tp_rank + 1) * S]
        if full_F != F:
            mask = mask[..., self.tp_rank * F:(self.tp_rank + 1) * F]
        return x * mask.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: the base's input [S, b, in(/T)] -> [S, b, out(/T)] (megatron's sequence-first layout)."""
        from megatron.core import tensor_parallel as tp
        h = torch.matmul(self._dropout(x), self.A.t())  # [S, b, R]: whole (column) or a partial sum (row)
        if self.kind == "column":
            if self.tp_size > 1:
                h = tp.gather_from_sequence_parallel_region(h) if self.sequence_parallel else \
                    tp.copy_to_tensor_model_parallel_region(h)
        elif self.tp_size > 1:
            h = tp.reduce_scatter_to_sequence_parallel_region(h) if self.sequence_parallel else \
                tp.reduce_from_tensor_model_parallel_region(h)
        return torch.matmul(h, self.B.t()) * self.spec.scale


def _initial_a(rank: int, in_features: int, seed: int, name: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}.lora.A".encode())) % (2**63 - 1))
    bound = 1.0 / math.sqrt(in_features)
    return (torch.rand((rank, in_features), generator=gen) * 2.0 - 1.0) * bound


def _mark_tensor_parallel(param: nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, dim, 1


def _wrap_forward(linear: nn.Module) -> None:
    """The linear's forward returns (base output + adapter output, bias); the adapter is called as a
    module (ZeRO-3 gathers its parameters in its own hooks)."""
    base_forward = linear.forward

    def forward(input_, *args, **kwargs):
        out, bias = base_forward(input_, *args, **kwargs)
        return out + getattr(linear, ADAPTER)(input_).to(out.dtype), bias

    linear.forward = forward


def targeted_linears(model: nn.Module, targets) -> list[tuple[str, nn.Module]]:
    """(module name, linear) of every linear ``targets`` name, in the model's module order."""
    import fnmatch
    patterns = [TARGETS[t] for t in targets]
    return [(name, m) for name, m in model.named_modules()
            if any(fnmatch.fnmatchcase(name, p) for p in patterns)]


def attach(model: nn.Module, cfg, tensor_parallel_size: int, tensor_parallel_rank: int) -> int:
    """Give every targeted linear of ``model`` its adapter (module docstring); returns how many."""
    spec = spec_of(cfg)
    if spec is None:
        return 0
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    if getattr(cfg, "transformer_impl", "local") != "local":
        raise LoRAError("--lora-rank adapts megatron-core's local Column/RowParallelLinear layers: use "
                        "--transformer-impl local (the default).")
    linears = targeted_linears(model, spec.targets)
    for name, linear in linears:
        if isinstance(linear, ColumnParallelLinear):
            if linear.gather_output:
                raise LoRAError(f"{name}: a column-parallel linear that gathers its output is not adapted.")
            kind, out_full = "column", linear.output_size_per_partition * tensor_parallel_size
            in_full = linear.input_size
        elif isinstance(linear, RowParallelLinear):
            if not linear.input_is_parallel:
                raise LoRAError(f"{name}: a row-parallel linear that scatters its own input is not adapted.")
            kind, in_full, out_full = "row", linear.input_size_per_partition * tensor_parallel_size, linear.output_size
        else:
            raise LoRAError(f"{name} is a {type(linear).__name__}, not a megatron Column/RowParallelLinear.")
        adapter = LoRAAdapter(name, kind, in_full, out_full, spec, cfg.init_seed, tensor_parallel_size,
                              tensor_parallel_rank, bool(getattr(linear, "sequence_parallel", False)),
                              linear.weight.dtype)
        linear.add_module(ADAPTER, adapter)
        _wrap_forward(linear)
    return len(linears)


def is_adapter(param) -> bool:
    return getattr(param, "lora_adapter", False)


def adapter_names(names) -> list[str]:
    """The adapter parameters among parameter ``names`` (by their place: ``<linear>.lora.A|B``)."""
    return [n for n in names if n.rsplit(".", 2)[-2:-1] == [ADAPTER] and n.rsplit(".", 1)[-1] in ("A", "B")]


@torch.no_grad()
def merge(tensors: dict[str, torch.Tensor], spec: LoRASpec) -> dict[str, torch.Tensor]:
    """Whole (layout-free) tensors with adapters -> the same model without them:
    W <- W + (alpha / r) B A for every adapted linear, computed in float64."""
    out = {}
    adapters = set(adapter_names(tensors))
    for name, t in tensors.items():
        if name in adapters:
            continue
        prefix = name[:-len(".weight")] if name.endswith(".weight") else None
        a, b = (f"{prefix}.{ADAPTER}.A", f"{prefix}.{ADAPTER}.B") if prefix else (None, None)
        if a in tensors and b in tensors:
            delta = tensors[b].double() @ tensors[a].double() * spec.scale
            t = (t.double() + delta).to(t.dtype)
        out[name] = t
    return out
