"""One training step of rank R of an N-rank job, on fake tensors, with memory and collectives tracked.

The step is ``pretrain_dchag.forward_step``'s (MAE: patch mask, masked-patch loss over valid
pixels; forecast: lead-time input, latitude-weighted MSE) on the real ``DChagViT`` built for the
rank's layout, then backward and the optimizer as ZeRO 0/1/2 hold it (``dchag.sim.zero``). Two
steps run: the first (its optimizer part only) creates the optimizer state, the second is
measured, so its peak includes the state a rank carries through training.

Measured in the second step:

- memory: ``torch.distributed._tools.mem_tracker.MemTracker``'s peak, by category (parameters,
  gradients, activations, temporaries, optimizer state), every tensor counted at its storage size;
- saved activations: bytes of the distinct storages autograd saves for backward (parameters and
  inputs excluded), the count the benchmark makes on real tensors (``dchag.bench.measure``);
- collectives: every call, its group size and payload (``dchag.bench.measure.CommCounter``), per
  phase (forward, backward, optimizer).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from dchag.model.config import DChagConfig
from dchag.parallel.partition import LayoutError
from dchag.sim.zero import DEFAULT_BUCKET, ZeroEmulator


class SimError(LayoutError):
    """An input the simulation cannot run; the message names the fix."""


@dataclass(frozen=True)
class SimSpec:
    cfg: DChagConfig
    world_size: int
    rank: int = 0
    tensor_parallel: int = 1
    channel_parallel: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 1
    mask_ratio: float = 0.75
    seed: int = 1234
    bucket_size: int = DEFAULT_BUCKET
    # a blend of data sources (cfg.sources): the source the step takes (None: the one with the most
    # channels on this rank, whose activations are the largest)
    source: int | None = None

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    def validate(self) -> None:
        from dchag.parallel.partition import validate_layout
        validate_layout(self.world_size, self.tensor_parallel, self.channel_parallel)
        self.cfg.validate_layout(self.tensor_parallel, self.channel_parallel)
        if self.zero_stage not in (0, 1, 2):
            raise SimError(f"--zero-stage {self.zero_stage} is not simulated: choose 0, 1 or 2 (ZeRO-3's parameter "
                           "partitioning runs in DeepSpeed's hooks; tools/estimate_memory.py estimates it).")
        if self.micro_batch_size < 1:
            raise SimError(f"--micro-batch-size must be >= 1, got {self.micro_batch_size}.")


def step_source(spec: SimSpec, model) -> int:
    """The data source the simulated step takes (dchag/parallel/sources.py)."""
    if spec.source is not None:
        return spec.source
    lay = model.source_layout
    return max(range(lay.num_sources), key=lambda s: (len(model.input_channels(s)), -s))


def _batch(spec: SimSpec, model, fake_mode, source: int = 0):
    """Fake inputs of the rank's shapes (what the data loader hands ``forward_step``)."""
    cfg, B = spec.cfg, spec.micro_batch_size
    c_r = len(model.input_channels(source))
    with fake_mode:
        batch = {"images": torch.empty(B, c_r, cfg.img_h, cfg.img_w), "valid": torch.empty(B, c_r, cfg.img_h, cfg.img_w,
                                                                                             dtype=torch.bool)}
        if cfg.task == "forecast":
            V = len(cfg.predicted_channels)
            batch.update(target=torch.empty(B, V, cfg.img_h, cfg.img_w),
                         target_valid=torch.empty(B, V, cfg.img_h, cfg.img_w, dtype=torch.bool),
                         lat_weights=torch.empty(B, cfg.img_h))
    if cfg.task == "mae":
        from dchag.tasks.mae import patch_mask
        batch["mask"] = fake_mode.from_tensor(patch_mask(torch.arange(B), cfg.num_patches, spec.mask_ratio, spec.seed, 0))
    return batch


def forward_loss(model, batch, cfg, source: int = 0):
    """``pretrain_dchag.forward_step`` for one micro batch (the same calls, on the given tensors)."""
    from dchag.tasks import forecast_loss, mae_loss
    images = torch.where(batch["valid"], batch["images"], torch.zeros_like(batch["images"]))
    if cfg.task == "mae":
        pred = model(images, patch_mask=batch["mask"], source=source)
        return mae_loss(pred, images, batch["valid"], batch["mask"], cfg.grid, cfg.patch_dim)
    lead = torch.full((images.shape[0],), 1.0)
    pred = model(images, lead_time=lead)
    return forecast_loss(pred, batch["target"], batch["target_valid"], batch["lat_weights"])


def _tracker():
    """MemTracker that also remembers where the peak happened (phase and innermost module)."""
    from torch.distributed._tools.mem_tracker import MemTracker

    from dchag.bench.measure import current_phase

    class Tracker(MemTracker):
        peak_where = ""

        def _update_peak_stats(self, peak_state):
            before = dict(self._peak_mem)
            super()._update_peak_stats(peak_state)
            if self._peak_mem != before:
                modules = [m for m in self._mod_tracker.parents if m != "Global"]
                self.peak_where = f"{current_phase()} {max(modules, key=len) if modules else '(outside the model)'}"

    return Tracker()


def _span(channels) -> list[int]:
    """[first, last + 1] of the rank's input channels (a blend's source may repeat or reorder them)."""
    channels = list(channels)
    return [min(channels), max(channels) + 1]


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def simulate(spec: SimSpec) -> dict:
    """Build the model for ``spec.rank`` of the job and run two training steps on fake tensors.

    Returns a dict: ``params_per_rank``, ``param_shapes``, ``param_bytes``, ``grad_bytes``,
    ``partition_grad_bytes``, ``optimizer_bytes``, ``data_bytes``, ``saved_activation_bytes``,
    ``peak_bytes``, ``peak_by_category``, ``peak_where``, ``collectives`` (per phase and the raw
    records), ``layout``, ``seconds``.
    """
    spec.validate()
    from torch._subclasses.fake_tensor import FakeTensorMode
    from dchag.bench.measure import CommCounter, count_saved_tensors, phase
    from dchag.model.vit import DChagViT
    from dchag.sim.world import fake_world

    t0 = time.perf_counter()
    out: dict = {}
    with fake_world(spec.world_size, spec.rank, spec.tensor_parallel, spec.channel_parallel, spec.seed), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated collectives, megatron's CPU notes, MemTracker's module hooks
        from megatron.core import parallel_state as ps
        fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
        with fake_mode:
            model = DChagViT(spec.cfg)
        out["build_seconds"] = time.perf_counter() - t0
        source = step_source(spec, model)
        batch = _batch(spec, model, fake_mode, source)
        params = list(model.parameters())
        zero = ZeroEmulator(params, spec.zero_stage, ps.get_data_parallel_group(), spec.bucket_size)
        inputs = [t for t in batch.values() if isinstance(t, torch.Tensor)]
        counter = CommCounter()

        def step():
            with phase("forward"), count_saved_tensors(params + inputs) as saved:
                loss = forward_loss(model, batch, spec.cfg, source)
            with phase("backward"):
                loss.backward()
            zero.reduce_gradients()
            zero.step()
            zero.zero_grad()
            return saved

        with fake_mode:
            # the first step's optimizer part creates the optimizer state (gradients' values do not matter)
            for p in params:
                p.grad = torch.empty_like(p)
            zero.reduce_gradients()
            zero.step()
            zero.zero_grad()
            tracker = _tracker()
            tracker.track_external(model, *inputs, *zero.tensors(), *(
                [zero.optimizer] if zero.optimizer is not None else []))
            with counter, tracker:
                saved = step()
        out["peak_by_category"] = {k: int(v) for k, v in tracker.get_tracker_snapshot("peak")[torch.device("cpu")].items()}
        out["peak_where"] = tracker.peak_where
        out["peak_bytes"] = int(tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"])
        out["params_per_rank"] = sum(p.numel() for p in params)
        out["param_shapes"] = {n: list(p.shape) for n, p in model.named_parameters()}
        out["param_bytes"] = _nbytes(params)
        # at the step: the model's gradients (ZeRO-2: freed bucket by bucket) and the partition's fp32 gradient
        out["grad_bytes"] = _nbytes(params) if spec.zero_stage < 2 else 0
        out["partition_grad_bytes"] = 4 * zero.partition if zero.master is not None else 0
        opt_tensors = [t for s in zero.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
                       and t.dim() > 0]
        out["optimizer_bytes"] = _nbytes(opt_tensors) + (_nbytes([zero.master]) if zero.master is not None else 0)
        out["zero_partition"] = zero.partition
        out["saved_activation_bytes"] = saved["bytes"]
        out["data_bytes"] = _nbytes(inputs)
        out["collectives"] = {"by_phase": counter.summary(), "records": counter.records}
        out["layout"] = {"world_size": spec.world_size, "rank": spec.rank, "T": spec.tensor_parallel,
                         "P": spec.channel_parallel, "DP": spec.data_parallel,
                         "tp_rank": ps.get_tensor_model_parallel_rank(), "cp_rank": ps.get_channel_parallel_rank(),
                         "dp_rank": ps.get_data_parallel_rank(),
                         "channels": _span(model.input_channels(source)), "source": source,
                         "channel_rows": len(model.channels)}
        zero.remove_hooks()
    out["seconds"] = time.perf_counter() - t0
    return out
