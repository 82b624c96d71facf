"""What one rank runs: every (C, method) case of a sweep for one tensor-parallel size T.

Per case the rank builds the layout (T, P), the model and a synthetic batch of its own channels,
then measures, after ``warmup`` unmeasured steps, ``steps`` steps of

- the channel stage alone: ``model.aggregate_channels(images).sum().backward()`` (tokenize,
  partial aggregation, gather, final aggregation; forward + backward, no optimizer);
- the whole training step: MAE forward, masked-patch loss, backward, AdamW step.

For each measured step: wall time (the step ends with a barrier, so it is the slowest rank's),
RSS before the step and VmHWM during it. Collectives are counted per phase on the last measured
step (they are the same every step), and one extra, unmeasured pass counts the bytes autograd
saves for backward.
"""

from __future__ import annotations

import dataclasses
import gc
import time

import torch
import torch.distributed as dist

from dchag.bench.config import METHODS, BenchConfig
from dchag.bench.measure import CommCounter, PeakMemory, count_saved_tensors, phase, rss_bytes

CHANNEL_STAGE_MODULES = ("tokenizer", "partial", "final")


def setup_layout(T: int, P: int, seed: int) -> None:
    import megatron_patches
    from megatron.core import parallel_state as ps, tensor_parallel
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(T, P)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def synthetic_batch(num_channels: int, channels: range, B: int, H: int, W: int, seed: int) -> torch.Tensor:
    """[B, len(channels), H, W] of the synthetic hyperspectral generator, this rank's channels only."""
    from dchag.data.readers.synthetic import SyntheticSource
    src = SyntheticSource(num_channels=num_channels, height=H, width=W, num_images=B, seed=seed)
    return torch.stack([torch.from_numpy(src.read(i, channels=channels)) for i in range(B)])


def _numel(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _measure(run_step, zero_grad, counter: CommCounter, warmup: int, steps: int) -> dict:
    times, before, peak = [], [], []
    comm = None
    for i in range(warmup + steps):
        zero_grad()
        dist.barrier()
        counter.reset()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            run_step()
            dist.barrier()
            elapsed = time.perf_counter() - t0
        if i >= warmup:
            times.append(elapsed)
            before.append(mem.before)
            peak.append(mem.peak)
            summary = counter.summary()
            if comm is not None and summary != comm:
                raise RuntimeError(f"collectives changed between steps: {comm} != {summary}")
            comm = summary
    return {"times_s": times, "rss_before": before, "peak": peak, "comm": comm or {},
            "records": [dict(r) for r in counter.records]}


def _saved_bytes(forward_loss, keep) -> int:
    """Bytes autograd saves for backward in one ``forward_loss()`` (tensors in ``keep`` not counted)."""
    with count_saved_tensors(keep) as saved:
        loss = forward_loss()
    loss.backward()
    return saved["bytes"]


def run_case(T: int, C: int, method_name: str, cfg: BenchConfig, counter: CommCounter) -> dict:
    from dchag.model.vit import DChagViT
    from dchag.tasks.mae import mae_loss, patch_mask
    from megatron.core import parallel_state as ps

    method = METHODS[method_name]
    P = method.channel_parallel_size(T)
    m = cfg.model
    setup_layout(T, P, cfg.seed)
    gc.collect()
    rss_lib = rss_bytes()

    dcfg = m.dchag_config(C, method)
    model = DChagViT(dcfg)
    B = m.micro_batch_size
    images = synthetic_batch(C, model.channels, B, m.img_h, m.img_w, cfg.seed)
    valid = torch.ones_like(images, dtype=torch.bool)
    mask = patch_mask(torch.arange(B), dcfg.num_patches, m.mask_ratio, cfg.seed, 0)
    params = list(model.parameters())
    keep = params + [images, valid, mask]
    channel_modules = [getattr(model, n) for n in CHANNEL_STAGE_MODULES]

    out = {
        "T": T, "P": P, "C": C, "method": method_name, "rank": dist.get_rank(),
        "channels": [model.channels.start, model.channels.stop],
        "param_numel": sum(p.numel() for p in params),
        "channel_stage_param_numel": _numel(channel_modules),
        "param_bytes": sum(p.numel() * p.element_size() for p in params),
        "rss_lib": rss_lib,
    }

    # --- channel stage alone: tokenize + aggregate, forward + backward
    def channel_loss():
        return model.aggregate_channels(images).sum()

    def channel_step():
        with phase("forward"):
            loss = channel_loss()
        with phase("backward"):
            loss.backward()

    out["channel"] = _measure(channel_step, lambda: model.zero_grad(set_to_none=True), counter,
                              cfg.warmup, cfg.steps)
    model.zero_grad(set_to_none=True)
    out["channel"]["saved_bytes"] = _saved_bytes(channel_loss, keep)
    model.zero_grad(set_to_none=True)

    # --- whole training step: forward, loss, backward, optimizer
    if cfg.whole_step:
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, foreach=False)

        def forward_loss():
            pred = model(images, patch_mask=mask)
            return mae_loss(pred, images, valid, mask, dcfg.grid, dcfg.patch_dim)

        def whole_step():
            with phase("forward"):
                loss = forward_loss()
            with phase("backward"):
                loss.backward()
            with phase("optimizer"):
                optimizer.step()

        out["step"] = _measure(whole_step, lambda: optimizer.zero_grad(set_to_none=True), counter,
                               cfg.warmup, cfg.steps)
        optimizer.zero_grad(set_to_none=True)
        out["step"]["saved_bytes"] = _saved_bytes(forward_loss, keep)
        out["opt_state_bytes"] = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                                     for t in s.values() if isinstance(t, torch.Tensor))
        del optimizer
    del model, images, valid, mask, params, keep, channel_modules
    gc.collect()
    ps.destroy_model_parallel()
    return out


def _mb(x: float) -> str:
    return f"{x / 2**20:.0f}"


def _progress(T, C, method, r, where, seconds):
    ch = r["channel"]
    line = (f"[bench] T={T} P={r['P']} C={C:<4d} {method:<8s} ({where}) "
            f"channel stage {sorted(ch['times_s'])[len(ch['times_s']) // 2] * 1e3:7.1f} ms "
            f"peak+{_mb(max(ch['peak']) - min(ch['rss_before']))} MB")
    if "step" in r:
        st = r["step"]
        line += (f" | whole step {sorted(st['times_s'])[len(st['times_s']) // 2] * 1e3:7.1f} ms "
                 f"peak {_mb(max(st['peak']) - r['rss_lib'])} MB above libraries")
    print(line + f" [{seconds:.0f} s]", flush=True)


def run_rank(T: int, cfg: BenchConfig, progress: bool = True) -> list[dict]:
    """Every case of the sweep for this T, on this rank (collective: all T ranks call it)."""
    import megatron_patches
    megatron_patches.apply()
    counter = CommCounter().install()
    results = []
    try:
        # Lazily initialized state (gloo buffers, kernels' first-use allocations, autograd engine
        # threads) would otherwise be charged to the first case: run each method once, unmeasured.
        primer = dataclasses.replace(cfg, warmup=0, steps=1)
        for method in cfg.methods:
            run_case(T, min(cfg.channels), method, primer, counter)
        cases = cfg.cases(T)
        by_case: dict = {}
        for rnd in range(cfg.rounds):
            # alternate the order so no method always runs first (or last) on a loaded machine
            order = cases if rnd % 2 == 0 else cases[::-1]
            for k, (C, method) in enumerate(order, 1):
                t0 = time.perf_counter()
                r = run_case(T, C, method, cfg, counter)
                by_case.setdefault((C, method), []).append(r)
                if progress and dist.get_rank() == 0:
                    _progress(T, C, method, r, f"round {rnd + 1}/{cfg.rounds}, {k}/{len(cases)}",
                              time.perf_counter() - t0)
        for case in cases:
            runs = by_case[case]
            merged = runs[-1]
            for part in ("channel", "step"):
                if part in merged:
                    merged[part]["round_times_s"] = [r[part]["times_s"] for r in runs]
            results.append(merged)
    finally:
        counter.uninstall()
    return results
