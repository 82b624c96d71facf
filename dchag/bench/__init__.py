"""Side-by-side benchmarks of D-CHAG against tensor parallelism alone (CPU/gloo or GPU).

- ``measure``: per-process peak memory (VmHWM), counted collective bytes by phase, saved-activation bytes;
- ``worker``: what one rank runs for one configuration (channel stage alone, whole training step);
- ``runner``: spawns T ranks per tensor-parallel size and collects the per-rank results;
- ``report``: JSON, Markdown table, PNG plot, target ratios, planner comparison.

Entry point: ``tools/benchmark.py``.
"""
