"""``load_pretrained(path)``: a consolidated export as a model in this process, with the
training normalization attached, run on raw arrays.

    model = dchag.load_pretrained("export/", device="cpu")
    recon = model.reconstruct(x, mask_ratio=0.75, seed=0, channels=names)  # x [B, C, H, W] in data units
    future = model.forecast(x, lead_time=1)                  # forecast models: [B, V, H, W]
    maps = model.regress(x)                                  # regress models: [B, K, H, W] in target units
    classes = model.segment(x)                               # segment models: [B, H, W] class indices
    tokens = model.embed(x)                                  # [B, L, D] after the backbone (final norm), any task

Channels are matched by identity: ``channels=`` names the input's channels (a list of names, of
wavelengths in nm, or ``{"names": [...], "wavelengths": [...]}``); they are matched to the model's
by name, then wavelength, and reordered; extra ones are dropped; a model channel the input lacks is
refused, naming it, unless ``allow_missing_channels=True`` (then it is zero-filled as invalid
input). Without ``channels=`` the input is taken in the model's channel order (said once, on
stderr). The ``*_tiles`` methods take tiles already in the model's channels (tools/predict.py
reads them so).

Inputs are numpy arrays or tensors in the units the data files hold (what the readers return);
they are normalized with the saved statistics, invalid values (NaN/Inf) zero-filled as in
training, and outputs are returned in data units, the same kind as the input (numpy in, numpy
out). Pixels invalid in the input are NaN in a reconstruction (nothing was there to rebuild);
pixels where no input channel is valid are NaN in a regression and -1 in a class map.
"""

from __future__ import annotations

import numpy as np
import torch

from dchag.checkpointing import consolidated, normalization
from dchag.inference.runtime import build_serial_model, default_device
from dchag.checkpointing.errors import CheckpointError


class PretrainedDChag:
    def __init__(self, model, config: dict, device: torch.device):
        self.model, self.config, self.device = model, config, device
        self.cfg = model.cfg
        stats = normalization.arrays(config.get("normalization"))
        self.mean, self.std = (None, None) if stats is None else stats
        self.channel_names = config.get("channel_names")
        self.wavelengths = config.get("wavelengths")
        self._said: set[str] = set()

    # ---- normalization ---------------------------------------------------------------------
    def normalize(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw [B, C, H, W] -> (normalized float32 tensor with invalid values set to 0, valid mask)."""
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float32).cpu()
        if t.ndim == 3:
            t = t[None]
        C = self.cfg.num_channels
        if t.ndim != 4 or t.shape[1] != C or tuple(t.shape[2:]) != (self.cfg.img_h, self.cfg.img_w):
            raise ValueError(f"input of shape {tuple(t.shape)}: the model takes [B, {C}, {self.cfg.img_h}, "
                             f"{self.cfg.img_w}] (channels x the training tile size); cut larger images into tiles "
                             "(tools/predict.py does that).")
        valid = torch.isfinite(t)
        if self.mean is not None:
            t = (t - torch.from_numpy(self.mean)[:, None, None]) / torch.from_numpy(self.std)[:, None, None]
        return torch.where(valid, t, torch.zeros_like(t)), valid

    def denormalize(self, y: torch.Tensor, channels=None) -> torch.Tensor:
        y = y.to(torch.float32).cpu()
        if self.mean is None:
            return y
        idx = list(range(self.cfg.num_channels)) if channels is None else list(channels)
        mean, std = torch.from_numpy(self.mean[idx]), torch.from_numpy(self.std[idx])
        return y * std[:, None, None] + mean[:, None, None]

    @staticmethod
    def _like(out: torch.Tensor, x):
        return out if torch.is_tensor(x) else out.numpy()

    # ---- tasks -----------------------------------------------------------------------------
    @torch.no_grad()
    def forward_normalized(self, images: torch.Tensor, patch_mask=None, lead_time=None) -> torch.Tensor:
        """The model on normalized images [B, C, H, W] (what the training forward gets)."""
        args = {}
        if patch_mask is not None:
            args["patch_mask"] = patch_mask.to(self.device)
        if lead_time is not None:
            args["lead_time"] = lead_time.to(self.device)
        return self.model(images.to(self.device), **args)

    def mask(self, batch_size: int, mask_ratio: float, seed: int = 0, sample_index=None) -> torch.Tensor:
        """[B, L] bool, True = masked: the same rule as training (sample index, seed, step 0);
        sample ``sample_index[i]`` (default ``i``) for row i."""
        from dchag.tasks.mae import patch_mask
        index = torch.arange(batch_size) if sample_index is None else torch.as_tensor(np.asarray(sample_index))
        return patch_mask(index, self.cfg.num_patches, mask_ratio, seed, 0)

    def reconstruct_tiles(self, x, mask_ratio: float | None = None, seed: int = 0, return_mask: bool = False,
                          sample_index=None, complementary: bool = False):
        """MAE: the model's reconstruction of every pixel, in data units (NaN where the input was
        invalid). ``mask_ratio`` (default: the training run's) of the patches are hidden from the
        model, chosen by ``seed`` and each row's ``sample_index`` (default its position); 0 hides none.
        ``complementary``: every patch predicted from its context, in ceil(1 / ratio) passes with
        complementary masks (``dchag.tasks.mae.complementary_masks``); the mask returned is [P, B, L]."""
        self._need("mae", "reconstruct")
        images, valid = self.normalize(x)
        ratio = self.config.get("mask_ratio") if mask_ratio is None else mask_ratio
        ratio = float(ratio or 0.0)
        if complementary:
            from dchag.tasks.mae import complementary_masks, pixel_mask
            index = torch.arange(images.shape[0]) if sample_index is None else torch.as_tensor(np.asarray(sample_index))
            m = complementary_masks(index, self.cfg.num_patches, ratio, seed)
            y, taken = None, torch.zeros_like(m[0])
            for hidden in m:  # each patch from the first pass that hid it
                out = self.forward_normalized(images, patch_mask=hidden).cpu()
                new = pixel_mask(hidden & ~taken, self.cfg.grid, self.cfg.patch_dim)  # [B, 1, H, W]
                y, taken = out if y is None else torch.where(new, out, y), taken | hidden
            out = self.denormalize(y)
        else:
            m = self.mask(images.shape[0], ratio, seed, sample_index)
            out = self.denormalize(self.forward_normalized(images, patch_mask=m if m.any() else None))
        out = torch.where(valid, out, torch.full_like(out, float("nan")))
        return (self._like(out, x), m) if return_mask else self._like(out, x)

    def forecast_tiles(self, x, lead_time: float | None = None):
        """Forecast: the state ``lead_time`` steps ahead (default: the training run's), in data units."""
        self._need("forecast", "forecast")
        images, _ = self.normalize(x)
        lead = float(self.config.get("lead_time") or 1) if lead_time is None else float(lead_time)
        out = self.forward_normalized(images, lead_time=torch.full((images.shape[0],), lead))
        return self._like(self.denormalize(out, self.cfg.predicted_channels), x)

    def regress_tiles(self, x):
        """Regress: the K target maps [B, K, H, W] in the targets' units (the training tiles'
        statistics undone); NaN where no input channel of the pixel is valid."""
        from dchag.tasks.dense import mask_no_data
        from dchag.tasks.regress import denormalize
        self._need("regress", "regress")
        images, _ = self.normalize(x)
        out = self.forward_normalized(images).to(torch.float32).cpu()
        targets = self.config.get("targets") or {}
        if targets.get("mean") is not None:
            out = denormalize(out, targets["mean"], targets["std"])
        return self._like(mask_no_data(out, x), x)

    def segment_tiles(self, x, return_probabilities: bool = False):
        """Segment: the class of every pixel, int64 [B, H, W] (-1 where no input channel of the
        pixel is valid); ``return_probabilities``: the class probabilities [B, K, H, W] instead (NaN there)."""
        from dchag.tasks.dense import mask_no_data
        self._need("segment", "segment")
        images, _ = self.normalize(x)
        logits = self.forward_normalized(images).to(torch.float32).cpu()
        out = mask_no_data(logits.softmax(dim=1), x) if return_probabilities else \
            mask_no_data(logits.argmax(dim=1), x, fill=-1)
        return self._like(out, x)

    @torch.no_grad()
    def embed_tiles(self, x, lead_time: float | None = None):
        """[B, L, D]: the tokens after the backbone (and its final norm), before the head; the
        model's own task conditioning (forecast: the lead time) applies, MAE hides nothing."""
        images, _ = self.normalize(x)
        captured = {}
        hook = self.model.backbone.register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
        try:
            lead = None
            if self.cfg.task_model.conditioning == "lead_time":
                lead = torch.full((images.shape[0],), float(self.config.get("lead_time") or 1)
                                  if lead_time is None else float(lead_time))
            self.forward_normalized(images, lead_time=lead)
        finally:
            hook.remove()
        out = captured["x"]
        out = (out[0] if isinstance(out, tuple) else out).transpose(0, 1).to(torch.float32).cpu()
        return self._like(out, x)

    # ---- whole inputs, channels by identity ----------------------------------------------
    def reconstruct(self, x, mask_ratio: float | None = None, seed: int = 0, return_mask: bool = False,
                    sample_index=None, complementary: bool = False, *, channels=None,
                    allow_missing_channels: bool = False):
        """MAE reconstruction of ``x`` [B, C_in, H, W] (its channels matched to the model's, see
        :meth:`model_channels_of`), in the model's channels: :meth:`reconstruct_tiles`."""
        x = self.model_channels_of(x, channels, allow_missing_channels)
        return self.reconstruct_tiles(x, mask_ratio, seed, return_mask, sample_index, complementary)

    def forecast(self, x, lead_time: float | None = None, *, channels=None, allow_missing_channels: bool = False):
        """:meth:`forecast_tiles` of ``x`` with its channels matched to the model's."""
        return self.forecast_tiles(self.model_channels_of(x, channels, allow_missing_channels), lead_time)

    def regress(self, x, *, channels=None, allow_missing_channels: bool = False):
        """:meth:`regress_tiles` of ``x`` with its channels matched to the model's."""
        return self.regress_tiles(self.model_channels_of(x, channels, allow_missing_channels))

    def segment(self, x, return_probabilities: bool = False, *, channels=None, allow_missing_channels: bool = False):
        """:meth:`segment_tiles` of ``x`` with its channels matched to the model's."""
        return self.segment_tiles(self.model_channels_of(x, channels, allow_missing_channels), return_probabilities)

    def embed(self, x, lead_time: float | None = None, *, channels=None, allow_missing_channels: bool = False):
        """:meth:`embed_tiles` of ``x`` with its channels matched to the model's."""
        return self.embed_tiles(self.model_channels_of(x, channels, allow_missing_channels), lead_time)

    def channel_map(self, channels, count: int, allow_missing_channels: bool = False):
        """How an input of ``count`` channels (identities ``channels``: names and/or wavelengths,
        None: none) is read as the model's (:func:`dchag.inference.channels.map_channels`); what it
        says is reported once (stderr)."""
        from dchag.inference.channels import given_channels, map_channels
        cmap = map_channels(self.cfg, given_channels(channels, count), count, allow_missing=allow_missing_channels,
                            where="the input", flag="allow_missing_channels=True")
        self.say(*cmap.lines)
        return cmap

    def model_channels_of(self, x, channels=None, allow_missing_channels: bool = False):
        """``x`` [B, C_in, H, W] (or [C_in, H, W]) with its channels matched to the model's by name,
        then wavelength (``channels``: the input's names and/or wavelengths), reordered, extra ones
        dropped and missing ones NaN (invalid input; refused unless ``allow_missing_channels``).
        Without ``channels`` the input is taken in the model's channel order."""
        if not torch.is_tensor(x):
            x = np.asarray(x)
        if x.ndim == 3:
            x = x[None]
        if x.ndim != 4:
            raise ValueError(f"input of shape {tuple(x.shape)}: give [B, C, H, W] (or one image [C, H, W]).")
        return self.channel_map(channels, x.shape[1], allow_missing_channels).select(x)

    def say(self, *lines: str) -> None:
        """Print each line to stderr the first time this model says it."""
        import sys
        for line in lines:
            if line not in self._said:
                self._said.add(line)
                print(line, file=sys.stderr, flush=True)

    def _need(self, task: str, what: str) -> None:
        if self.cfg.task != task:
            raise ValueError(f"{what}() needs a model trained with --task {task}; this one was trained with --task "
                             f"{self.cfg.task}.")


def load_pretrained(path: str, device=None, dtype: torch.dtype = torch.float32) -> PretrainedDChag:
    """The consolidated export at ``path`` as a serial model on ``device`` (default: the GPU if
    there is one, else the CPU), in eval mode. No launcher needed: a 1-rank process group is
    created if the process has none."""
    tensors, config = consolidated.read(path)
    identity = {k: config[k] for k in ("channel_names", "wavelengths")  # exports made before the model recorded it
                if config["model"].get(k) is None and config.get(k) is not None}
    cfg = consolidated.config_from_dict(config["model"], bf16=dtype == torch.bfloat16, sequence_parallel=False,
                                        recompute_activations=False, **identity)
    model = build_serial_model(cfg)
    names = {n for n, _ in model.named_parameters()}
    extra, missing = sorted(set(tensors) - names), sorted(names - set(tensors))
    if missing or extra:
        raise CheckpointError(f"{path}/{consolidated.WEIGHTS} does not fit the model of its config.json: missing "
                              f"{missing[:3]}, unexpected {extra[:3]}.")
    from dchag.parallel.state_dict import load_full_state_dict
    load_full_state_dict(model, {k: v.to(dtype) for k, v in tensors.items()})
    device = torch.device(device) if device is not None else default_device()
    model.to(device).eval()
    return PretrainedDChag(model, config, device)
