"""Method specs of the parity study: ``NAME[:g=G][:k=K][:lrm=M][:OPTION=VALUE ...]``.

``flat`` is the baseline (ClimaX/ORBIT aggregation over all C channels) and always runs with
channel-parallel size 1; ``linear`` (D-CHAG-L) and ``cross`` (D-CHAG-C) run with the study's
--dchag-groups, --dchag-tree-levels and --channel-parallel-size unless the spec overrides G or k
(e.g. ``cross:k=2`` is D-CHAG-C with 2 tree levels, ``linear:g=32`` D-CHAG-L with 32 groups);
``lrm=M`` sets --dchag-partial-lr-mult for that method (``cross:lrm=0.1``). The named options of
``OPTIONS`` set one flag each: ``cross:proj=none`` (--dchag-cross-projections), ``linear:clr=size``
(--dchag-coefficient-lr-scale), ``linear:gn=layernorm`` (--dchag-group-norm).
"""

from __future__ import annotations

from dataclasses import dataclass

from dchag.model.config import CROSS_PROJECTIONS, GROUP_NORMS
from dchag.parallel.partition import LayoutError

NAMES = {"flat": "flat (baseline)", "linear": "D-CHAG-L", "cross": "D-CHAG-C"}


@dataclass(frozen=True)
class Option:
    dest: str  # the pretrain_dchag.py argument it sets
    choices: tuple[str, ...]
    aggregations: tuple[str, ...]  # the methods it applies to
    label: str  # in the report's method label


OPTIONS = {
    "proj": Option("dchag_cross_projections", CROSS_PROJECTIONS, ("cross",), "projections"),
    "clr": Option("dchag_coefficient_lr_scale", ("size", "none"), ("linear",), "coefficient lr"),
    "gn": Option("dchag_group_norm", GROUP_NORMS, ("linear", "cross"), "group norm"),
}


@dataclass(frozen=True)
class Method:
    spec: str
    aggregation: str
    groups: int | None = None  # None: the study's --dchag-groups
    tree_levels: int | None = None
    partial_lr_mult: float | None = None  # None: the study's --dchag-partial-lr-mult
    options: tuple[tuple[str, str], ...] = ()  # (OPTIONS key, value), in the spec's order

    def label(self, default_groups: int, default_levels: int) -> str:
        if self.aggregation == "flat":
            return NAMES["flat"]
        g = self.groups or default_groups
        k = self.tree_levels or default_levels
        return (f"{NAMES[self.aggregation]} G={g}" + (f" k={k}" if k > 1 else "")
                + (f" partial lr x{self.partial_lr_mult:g}" if self.partial_lr_mult is not None else "")
                + "".join(f" {OPTIONS[key].label} {value}" for key, value in self.options))

    def overrides(self, args) -> dict:
        """The argument values this method sets on top of the study's flags."""
        if self.aggregation == "flat":
            return {"dchag_aggregation": "flat", "dchag_groups": 1, "dchag_tree_levels": 1, "channel_parallel_size": 1}
        out = {"dchag_aggregation": self.aggregation, "dchag_groups": self.groups or args.dchag_groups,
               "dchag_tree_levels": self.tree_levels or args.dchag_tree_levels}
        if self.partial_lr_mult is not None:
            out["dchag_partial_lr_mult"] = self.partial_lr_mult
        out.update({OPTIONS[key].dest: value for key, value in self.options})
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
        kw, options = {}, []
        for opt in opts:
            key, _, value = opt.partition("=")
            if name == "flat":
                raise LayoutError(f"--methods: {spec!r}: flat aggregation has no groups, tree levels or partial stage.")
            option = OPTIONS.get(key)
            if key == "lrm" and _non_negative(value):
                kw["partial_lr_mult"] = float(value)
            elif option is not None and name in option.aggregations and value in option.choices:
                options.append((key, value))
            elif key not in ("g", "k") or not value.isdigit() or int(value) < 1:
                named = "; ".join(f"{k}={'|'.join(o.choices)} ({', '.join(o.aggregations)})" for k, o in OPTIONS.items())
                raise LayoutError(f"--methods: bad option {opt!r} in {spec!r}; options are g=G and k=K (positive "
                                  f"integers), lrm=M (a number >= 0) and {named}, e.g. linear:g=32, cross:k=2, "
                                  "cross:lrm=0.1 or linear:clr=size.")
            else:
                kw["groups" if key == "g" else "tree_levels"] = int(value)
        kw["options"] = tuple(options)
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
