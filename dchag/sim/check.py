"""``tools/estimate_memory.py --recommend --simulate``: the planner's choice, checked by simulation."""

from __future__ import annotations

from dchag.planner.plan import GB


def check_recommendation(rec, hw, tries: int = 3, simulate=None) -> bool:
    """Simulate rank 0 of the recommended layout (then the next ones, up to ``tries``) and print
    the simulated peak against the budget. True when a simulated layout fits."""
    from dchag.sim.report import compare, spec_from_plan, table
    from dchag.sim.step import simulate as run
    simulate = simulate or run
    budget = hw.usable_bytes
    checked = 0
    for plan in rec.fitting:
        if checked >= tries:
            break
        if plan.layout.zero_stage == 3:
            print(f"\nsimulation: skipping T={plan.layout.tensor_parallel} ZeRO-3 (ZeRO-3 is not simulated).")
            continue
        checked += 1
        spec = spec_from_plan(plan)
        print(f"\nsimulating rank 0 of T={spec.tensor_parallel} P={spec.channel_parallel} DP={spec.data_parallel} "
              f"ZeRO-{spec.zero_stage} ({spec.cfg.aggregation}) ...", flush=True)
        record = compare(spec, simulate(spec))
        print(table(record))
        peak = record["simulated_peak_gb"] * GB
        if peak <= budget:
            print(f"\nsimulation confirms: {peak / GB:.3f} GB simulated (planner {plan.memory.total / GB:.3f} GB) "
                  f"<= {budget / GB:g} GB usable.")
            return True
        print(f"\nsimulation: {peak / GB:.3f} GB simulated > {budget / GB:g} GB usable: this layout does not fit; "
              "checking the next one.")
    print("\nsimulation: no checked layout fits the budget.")
    return False
