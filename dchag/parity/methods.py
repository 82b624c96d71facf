"""Method specs of the parity study: ``NAME[:g=G][:k=K][:lrm=M][:proj=P][:clr=S]``.

``flat`` is the baseline (ClimaX/ORBIT aggregation over all C channels) and always runs with
channel-parallel size 1; ``linear`` (D-CHAG-L) and ``cross`` (D-CHAG-C) run with the study's
--dchag-groups, --dchag-tree-levels and --channel-parallel-size unless the spec overrides G or k
(e.g. ``cross:k=2`` is D-CHAG-C with 2 tree levels, ``linear:g=32`` D-CHAG-L with 32 groups);
``lrm=M`` sets --dchag-partial-lr-mult for that method (``cross:lrm=0.1``), ``proj=none``
--dchag-cross-projections (``cross:proj=none``, D-CHAG-C without its per-group projections),
``clr=size|none`` --dchag-coefficient-lr-scale (``linear:clr=size``).
"""

from __future__ import annotations

from dataclasses import dataclass

from dchag.model.config import CROSS_PROJECTIONS
from dchag.parallel.partition import LayoutError

NAMES = {"flat": "flat (baseline)", "linear": "D-CHAG-L", "cross": "D-CHAG-C"}


@dataclass(frozen=True)
class Method:
    spec: str
    aggregation: str
    groups: int | None = None  # None: the study's --dchag-groups
    tree_levels: int | None = None
    partial_lr_mult: float | None = None  # None: the study's --dchag-partial-lr-mult
    cross_projections: str | None = None  # None: the study's --dchag-cross-projections
    coefficient_lr_scale: str | None = None  # None: the study's --dchag-coefficient-lr-scale

    def label(self, default_groups: int, default_levels: int) -> str:
        if self.aggregation == "flat":
            return NAMES["flat"]
        g = self.groups or default_groups
        k = self.tree_levels or default_levels
        return (f"{NAMES[self.aggregation]} G={g}" + (f" k={k}" if k > 1 else "")
                + (f" partial lr x{self.partial_lr_mult:g}" if self.partial_lr_mult is not None else "")
                + (f" projections {self.cross_projections}" if self.cross_projections is not None else "")
                + (f" coefficient lr {self.coefficient_lr_scale}" if self.coefficient_lr_scale is not None else ""))

    def overrides(self, args) -> dict:
        """The argument values this method sets on top of the study's flags."""
        if self.aggregation == "flat":
            return {"dchag_aggregation": "flat", "dchag_groups": 1, "dchag_tree_levels": 1, "channel_parallel_size": 1}
        out = {"dchag_aggregation": self.aggregation, "dchag_groups": self.groups or args.dchag_groups,
               "dchag_tree_levels": self.tree_levels or args.dchag_tree_levels}
        if self.partial_lr_mult is not None:
            out["dchag_partial_lr_mult"] = self.partial_lr_mult
        if self.cross_projections is not None:
            out["dchag_cross_projections"] = self.cross_projections
        if self.coefficient_lr_scale is not None:
            out["dchag_coefficient_lr_scale"] = self.coefficient_lr_scale
        return out


def _non_negative(value: str) -> bool:
    try:
        return float(value) >= 0
    except ValueError:
        return False


def parse_methods(text: str) -> list[Method]:
    methods = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, *opts = spec.split(":")
        if name not in NAMES:
            raise LayoutError(f"--methods: unknown method {name!r} in {spec!r}; use flat, linear or cross "
                              "(optionally with :g=G, :k=K and :lrm=M, e.g. cross:g=8:k=2).")
        kw = {}
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "lrm" and _non_negative(value):
                kw["partial_lr_mult"] = float(value)
            elif key == "proj" and name == "cross" and value in CROSS_PROJECTIONS:
                kw["cross_projections"] = value
            elif key == "clr" and name == "linear" and value in ("size", "none"):
                kw["coefficient_lr_scale"] = value
            elif key not in ("g", "k") or not value.isdigit() or int(value) < 1:
                raise LayoutError(f"--methods: bad option {opt!r} in {spec!r}; options are g=G and k=K (positive "
                                  "integers), lrm=M (a number >= 0), for cross proj=P (one of "
                                  f"{', '.join(CROSS_PROJECTIONS)}) and for linear clr=size|none, e.g. linear:g=32, "
                                  "cross:k=2, cross:lrm=0.1, cross:proj=none or linear:clr=size.")
            else:
                kw["groups" if key == "g" else "tree_levels"] = int(value)
            if name == "flat":
                raise LayoutError(f"--methods: {spec!r}: flat aggregation has no groups, tree levels or partial stage.")
        methods.append(Method(spec, name, **kw))
    if not methods:
        raise LayoutError("--methods is empty; e.g. --methods flat,linear,cross.")
    flats = sum(m.aggregation == "flat" for m in methods)
    if flats > 1 or (flats and methods[0].aggregation != "flat"):
        raise LayoutError("--methods names flat more than once or not first: every gap is measured against it "
                          "(e.g. --methods flat,linear,cross).")
    if len({m.spec for m in methods}) != len(methods):
        raise LayoutError(f"--methods names a method twice: {text!r}.")
    return methods
