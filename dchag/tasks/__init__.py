"""Training objectives: masked autoencoding (``mae``) and forecasting (``forecast``)."""

from .forecast import forecast_loss
from .mae import mae_loss, patch_mask, pixel_mask

__all__ = ["forecast_loss", "mae_loss", "patch_mask", "pixel_mask"]
