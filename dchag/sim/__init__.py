"""One rank of a large job, simulated in one CPU process with the real code (``tools/simulate_scale.py``).

A fake process group (torch's "fake" backend) lets megatron's ``parallel_state`` and the channel
groups be built for the full world; ``FakeTensorMode`` runs the real ``DChagViT`` on shapes only,
``MemTracker`` follows every tensor's storage to the peak, and the benchmark's ``CommCounter``
counts every collective (the fake group completes them without moving data).

- ``world``: the fake world (process groups of an N-rank job, seen from rank R);
- ``zero``: what the rank holds for the optimizer under ZeRO 0/1/2 (gradient buckets reduced over
  the data-parallel group, fp32 master partition, Adam moments), emulated on fake tensors;
- ``step``: one training step (forward, loss, backward, optimizer) under the trackers;
- ``report``: the planner's prediction beside it, the table and the JSON;
- ``cli`` (``tools/simulate_scale.py``), ``check`` (``tools/estimate_memory.py --recommend --simulate``),
  ``paper`` (the paper's configurations, docs/BENCHMARKS.md section 7).
"""

from dchag.sim.step import SimError, SimSpec, simulate

__all__ = ["SimError", "SimSpec", "simulate"]
