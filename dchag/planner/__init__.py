"""Memory / communication / FLOPs planner for D-CHAG and TP-alone layouts (``tools/estimate_memory.py``)."""

from dchag.planner.spec import LayoutSpec, ModelSpec, PlanError, validate

__all__ = ["LayoutSpec", "ModelSpec", "PlanError", "validate"]
