"""Tasks as objects: each owns its loss, metrics, baselines, pictures, export fields and prediction
(dchag/tasks/base.py); ``get_task(name)`` looks one up (registry.py). The model only knows which
head and conditioning a task needs (``TASK_MODELS`` in dchag/model/config.py).

    mae       masked autoencoding: reconstruct the hidden patches of every channel (mae.py)
    forecast  the state --lead-time steps ahead, latitude-weighted (forecast.py, weather_metrics.py)
    regress   K per-pixel target maps, MSE over valid pixels, R^2 per target (regress.py)
    segment   a per-pixel class map, cross-entropy, accuracy and mean IoU (segment.py)
"""

from .registry import TASKS, get_task

_FUNCTIONS = {"mae_loss": "mae", "patch_mask": "mae", "pixel_mask": "mae", "forecast_loss": "forecast"}


def __getattr__(name):  # the loss functions, imported on first use (they pull in the model's collectives)
    if name in _FUNCTIONS:
        import importlib
        return getattr(importlib.import_module(f"{__name__}.{_FUNCTIONS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["TASKS", "forecast_loss", "get_task", "mae_loss", "patch_mask", "pixel_mask"]
