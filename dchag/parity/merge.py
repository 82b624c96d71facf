"""Report studies run apart as one: ``tools/parity.py --merge DIR [DIR ...] --output-dir OUT``.

A long study can be split over processes or machines, by method (``--methods flat,linear`` in one,
``--methods cross`` in another) or by seed (``--seed 1234 --seeds 5`` and ``--seed 1239 --seeds 5``),
as long as every part trains the same task on the same data for the same number of iterations.
The merged report pairs the runs by seed exactly as a single study would.
"""

from __future__ import annotations

import json
import os

from dchag.parallel.partition import LayoutError
from dchag.parity import arrays

# What every part must share for its runs to be comparable (setup keys of parity.json).
SAME_SETUP = ("task", "data_path", "train_iters", "held_out_samples", "scored_per_evaluation", "num_channels")
PER_SEED = ("val_loss", "train_loss", "metrics", "seconds")


def _load(directory: str) -> tuple[dict, dict]:
    path = os.path.join(directory, "parity.json")
    if not os.path.isfile(path):
        raise LayoutError(f"--merge: {path} does not exist; give the --output-dir of finished tools/parity.py runs.")
    with open(path) as f:
        results = json.load(f)
    return results, arrays.load_from(directory)  # never a pickle that can run: npz, or a restricted load


def merge_studies(directories: list[str], methods: list[str] | None = None, common_seeds: bool = False) -> dict:
    """The results of several parity studies as one (the input of ``report.write_report``);
    ``methods``: only these method specs (e.g. leave out a variant that ran on fewer seeds);
    ``common_seeds``: report only the seeds every (kept) method has, instead of refusing a method
    that misses some (e.g. a variant run on 5 of flat's 21 seeds, paired with those 5)."""
    if len(directories) < 2:
        raise LayoutError("--merge needs at least two study directories.")
    parts = [(d, *_load(d)) for d in directories]
    first_dir, first, _ = parts[0]
    for d, r, _ in parts[1:]:
        for key in SAME_SETUP:
            if r["setup"][key] != first["setup"][key]:
                raise LayoutError(f"--merge: {d} and {first_dir} differ in {key} ({r['setup'][key]!r} vs "
                                  f"{first['setup'][key]!r}); only studies of the same task, data and length merge.")
    by_method: dict[str, dict] = {}  # spec -> {"label", "spec", "runs": {seed: that run's values and curve}}
    pictures: dict = {}
    for d, r, pics in parts:
        for spec, m in r["methods"].items():
            if methods is not None and spec not in methods:
                continue
            slot = by_method.setdefault(spec, {"label": m["label"], "spec": spec, "runs": {}})
            for i, seed in enumerate(r["seeds"]):
                if seed in slot["runs"]:
                    raise LayoutError(f"--merge: {spec} seed {seed} is in two of the directories ({d} is the "
                                      "second); split a study by method or by seed, not both at once.")
                slot["runs"][seed] = {**{k: m[k][i] for k in PER_SEED}, "curve": m["curves"][str(seed)]}
            if spec in pics and spec not in pictures:
                pictures[spec] = pics[spec]
    absent = [spec for spec in methods or () if spec not in by_method]
    if absent:
        raise LayoutError(f"--merge --methods: {', '.join(absent)} is in none of the directories (they hold "
                          f"{', '.join(sorted({s for _, r, _ in parts for s in r['methods']}))}).")
    seeds = sorted({s for slot in by_method.values() for s in slot["runs"]})
    if common_seeds:
        seeds = [s for s in seeds if all(s in slot["runs"] for slot in by_method.values())]
        if not seeds:
            held = "; ".join(f"{spec}: {sorted(slot['runs'])}" for spec, slot in by_method.items())
            raise LayoutError(f"--merge --common-seeds: no seed has a run of every method ({held}).")
    for spec, slot in by_method.items():
        missing = [s for s in seeds if s not in slot["runs"]]
        if missing:
            raise LayoutError(f"--merge: {spec} has no run for seed(s) {missing}; every method needs every seed "
                              "for the paired gaps (--common-seeds: report the seeds every method has).")
    order = sorted(by_method, key=lambda spec: spec != "flat")  # flat first, then as found
    methods = {}
    for spec in order:
        slot = by_method[spec]
        entry = {"label": slot["label"], "spec": spec, "curves": {str(s): slot["runs"][s]["curve"] for s in seeds}}
        entry.update({k: [slot["runs"][s][k] for s in seeds] for k in PER_SEED})
        methods[spec] = entry
    setup = dict(first["setup"])
    setup["merged_from"] = [{"directory": d, "argv": r["setup"]["argv"]} for d, r, _ in parts]
    # The baselines depend on the data and the base seed's masks: the part with flat (else the first) has them.
    source = next((r for _, r, _ in parts if "flat" in r["methods"]), first)
    return {"methods": methods, "seeds": seeds, "baselines": source["baselines"], "pictures": pictures,
            "setup": setup}
