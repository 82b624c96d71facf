"""The tasks by name: ``get_task(args.task)``. Callers (pretrain_dchag.py, tools/parity.py,
predict, the exporter) look a task up here and never branch on its name.

Task modules are imported on first use, so parsing arguments does not import the model code."""

from __future__ import annotations

import importlib

# name -> "module:class"
TASKS = {
    "mae": "dchag.tasks.mae:MAETask",
    "forecast": "dchag.tasks.forecast:ForecastTask",
    "regress": "dchag.tasks.regress:RegressTask",
    "segment": "dchag.tasks.segment:SegmentTask",
}
_instances: dict = {}


class UnknownTaskError(ValueError):
    pass


def get_task(name: str):
    """The task object of ``name`` (one shared, stateless instance per task)."""
    if name not in TASKS:
        raise UnknownTaskError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}.")
    if name not in _instances:
        module, cls = TASKS[name].split(":")
        _instances[name] = getattr(importlib.import_module(module), cls)()
    return _instances[name]
