"""``load_pretrained(path)``: a consolidated export as a model in this process, with the
training normalization attached, run on raw arrays of any size.

    model = dchag.load_pretrained("export/", device="cpu")
    recon = model.reconstruct(x, mask_ratio=0.75, seed=0)   # x [B, C, H, W] in data units -> [B, C, H, W]
    future = model.forecast(x, lead_time=1)                  # forecast models: [B, V, H, W]
    maps = model.regress(x, channels=names)                  # regress models: [B, K, H, W] in target units
    classes = model.segment(x)                               # segment models: [B, H, W] class indices
    features = model.embed(x)                                # [B, D, H/p, W/p]: the backbone's token per patch

**Any size.** H x W need not be the training tile: the methods cut the images into tiles and
stitch the outputs back exactly as tools/predict.py does (:mod:`dchag.inference.tiling`;
``overlap=PIXELS`` blends neighbouring tiles, ``batch_size`` tiles per forward). The ``*_tiles``
methods (``reconstruct_tiles`` ... ``embed_tiles``: tokens [B, L, D]) take tiles of the training
size already in the model's channels, one forward each.

**Channels by identity.** ``channels=`` names the input's channels (a list of names, of wavelengths
in nm, or ``{"names": [...], "wavelengths": [...]}``); they are matched to the model's by name, then
wavelength, and reordered; extra ones are dropped; a model channel the input lacks is refused,
naming it, unless ``allow_missing_channels=True`` (then it is zero-filled as invalid input).
Without ``channels=`` the input is taken in the model's channel order (said once, on stderr).

Inputs are numpy arrays or tensors in the units the data files hold (what the readers return);
they are normalized with the saved statistics, invalid values (NaN/Inf) zero-filled as in
training, and outputs are returned in data units, the same kind as the input (numpy in, numpy
out). Pixels invalid in the input are NaN in a reconstruction (nothing was there to rebuild);
pixels where no input channel is valid are NaN in a regression and -1 in a class map.

The same object wraps a model built over many ranks (tools/predict.py under torchrun,
:mod:`dchag.inference.distributed`): each rank then holds and reads ``channels`` (its own), and the
tile methods, called on every rank of the model-parallel group, return every channel's output.
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
        # The model channels this process reads and tokenizes (all of them in one process).
        self.channels = list(getattr(model, "channels", range(self.cfg.num_channels)))
        partition = getattr(model, "partition", None)
        self.rows_per_rank = [len(partition.rank_channels(r)) for r in range(partition.channel_parallel_size)] \
            if partition is not None else [self.cfg.num_channels]
        self._said: set[str] = set()

    # ---- normalization ---------------------------------------------------------------------
    def normalize(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw [B, c, H, W] (this process's ``channels``) -> (normalized float32 tensor with invalid
        values set to 0, valid mask)."""
        t = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(torch.float32).cpu()
        if t.ndim == 3:
            t = t[None]
        c = len(self.channels)
        if t.ndim != 4 or t.shape[1] != c or tuple(t.shape[2:]) != (self.cfg.img_h, self.cfg.img_w):
            raise ValueError(f"input of shape {tuple(t.shape)}: the tile methods take [B, {c}, {self.cfg.img_h}, "
                             f"{self.cfg.img_w}] (channels x the training tile size); reconstruct/forecast/regress/"
                             "segment/embed take any size.")
        valid = torch.isfinite(t)
        if self.mean is not None:
            mean, std = self.mean[self.channels], self.std[self.channels]
            t = (t - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]
        return torch.where(valid, t, torch.zeros_like(t)), valid

    def denormalize(self, y: torch.Tensor, channels=None) -> torch.Tensor:
        """[B, c, H, W] normalized values of model channels ``channels`` (default: this process's) in data units."""
        y = y.to(torch.float32).cpu()
        if self.mean is None:
            return y
        idx = self.channels if channels is None else list(channels)
        mean, std = torch.from_numpy(self.mean[idx]), torch.from_numpy(self.std[idx])
        return y * std[:, None, None] + mean[:, None, None]

    def all_channels(self, t: torch.Tensor) -> torch.Tensor:
        """[B, c, ...] of this process's channels -> [B, C, ...] of every model channel (a gather
        over the channel-parallel group; nothing in one process)."""
        if len(self.rows_per_rank) == 1:
            return t
        from dchag.parallel.comm import gather_channel_rows
        return gather_channel_rows(t, self.rows_per_rank, dim=1)

    def any_valid(self, x) -> torch.Tensor:
        """[B, H, W] bool: pixels of raw ``x`` [B, c, H, W] where any model channel is valid."""
        t = x if torch.is_tensor(x) else torch.from_numpy(np.asarray(x))
        valid = torch.isfinite(t).any(dim=1)
        if len(self.rows_per_rank) == 1:
            return valid
        from dchag.parallel.comm import any_over_channel_group
        return any_over_channel_group(valid)

    @staticmethod
    def _like(out: torch.Tensor, x):
        return out if torch.is_tensor(x) else out.numpy()

    # ---- tiles of the training size, in the model's channels -------------------------------
    @torch.no_grad()
    def forward_normalized(self, images: torch.Tensor, patch_mask=None, lead_time=None) -> torch.Tensor:
        """The model on normalized images [B, c, H, W] (what the training forward gets)."""
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
        out = self.all_channels(torch.where(valid, out, torch.full_like(out, float("nan"))))
        return (self._like(out, x), m) if return_mask else self._like(out, x)

    def forecast_tiles(self, x, lead_time: float | None = None):
        """Forecast: the state ``lead_time`` steps ahead (default: the training run's), in data units;
        NaN where the predicted channel's input value is invalid."""
        self._need("forecast", "forecast")
        images, valid = self.normalize(x)
        lead = float(self.config.get("lead_time") or 1) if lead_time is None else float(lead_time)
        out = self.forward_normalized(images, lead_time=torch.full((images.shape[0],), lead))
        predicted = list(self.cfg.predicted_channels)
        out = self.denormalize(out, predicted)
        valid = self.all_channels(valid)[:, predicted]
        return self._like(torch.where(valid, out, torch.full_like(out, float("nan"))), x)

    def regress_tiles(self, x):
        """Regress: the K target maps [B, K, H, W] in the targets' units (the training tiles'
        statistics undone); NaN where no input channel of the pixel is valid."""
        from dchag.tasks.regress import denormalize
        self._need("regress", "regress")
        images, _ = self.normalize(x)
        out = self.forward_normalized(images).to(torch.float32).cpu()
        targets = self.config.get("targets") or {}
        if targets.get("mean") is not None:
            out = denormalize(out, targets["mean"], targets["std"])
        return self._like(out.masked_fill(~self.any_valid(x)[:, None], float("nan")), x)

    def segment_tiles(self, x, return_probabilities: bool = False):
        """Segment: the class of every pixel, int64 [B, H, W] (-1 where no input channel of the
        pixel is valid); ``return_probabilities``: the class probabilities [B, K, H, W] instead (NaN there)."""
        self._need("segment", "segment")
        images, _ = self.normalize(x)
        logits = self.forward_normalized(images).to(torch.float32).cpu()
        empty = ~self.any_valid(x)
        out = logits.softmax(dim=1).masked_fill(empty[:, None], float("nan")) if return_probabilities else \
            logits.argmax(dim=1).masked_fill(empty, -1)
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

    # ---- whole images of any size, channels by identity ------------------------------------
    def reconstruct(self, x, mask_ratio: float | None = None, seed: int = 0, return_mask: bool = False,
                    sample_index=None, complementary: bool = False, *, channels=None,
                    allow_missing_channels: bool = False, overlap: int = 0, batch_size: int = 8):
        """MAE reconstruction [B, C, H, W] (the model's channels, data units) of ``x`` [B, C_in, H, W]
        of any size (see :meth:`reconstruct_tiles`). Tile k of the call (image, tile row, tile column
        order) hides the patches of sample index k, as tools/predict.py does. ``return_mask`` and
        ``sample_index`` need images of exactly one tile."""
        self._need("mae", "reconstruct")
        x = self.model_channels_of(x, channels, allow_missing_channels)
        if return_mask or sample_index is not None:
            if tuple(x.shape[2:]) != (self.cfg.img_h, self.cfg.img_w) or overlap:
                raise ValueError("return_mask and sample_index apply to images of exactly the training tile size "
                                 f"({self.cfg.img_h} x {self.cfg.img_w}) without overlap.")
            return self.reconstruct_tiles(x, mask_ratio, seed, return_mask, sample_index, complementary)
        return self._whole("mae", x, {"mask_ratio": mask_ratio, "seed": seed, "complementary": complementary},
                           overlap, batch_size)

    def forecast(self, x, lead_time: float | None = None, *, channels=None, allow_missing_channels: bool = False,
                 overlap: int = 0, batch_size: int = 8):
        """Forecast [B, V, H, W] of ``x`` [B, C_in, H, W] of any size (see :meth:`forecast_tiles`)."""
        self._need("forecast", "forecast")
        return self._whole("forecast", self.model_channels_of(x, channels, allow_missing_channels),
                           {"lead_time": lead_time}, overlap, batch_size)

    def regress(self, x, *, channels=None, allow_missing_channels: bool = False, overlap: int = 0,
                batch_size: int = 8):
        """The K target maps [B, K, H, W] of ``x`` [B, C_in, H, W] of any size (see :meth:`regress_tiles`)."""
        self._need("regress", "regress")
        return self._whole("regress", self.model_channels_of(x, channels, allow_missing_channels), {}, overlap,
                           batch_size)

    def segment(self, x, return_probabilities: bool = False, *, channels=None, allow_missing_channels: bool = False,
                overlap: int = 0, batch_size: int = 8):
        """Class map int64 [B, H, W] (-1 where no input channel is valid) of ``x`` [B, C_in, H, W] of any
        size; ``return_probabilities``: [B, K, H, W] (NaN there). With overlap the tiles' class
        probabilities are blended, then the most probable class taken."""
        self._need("segment", "segment")
        prob = self._whole("segment", self.model_channels_of(x, channels, allow_missing_channels), {}, overlap,
                           batch_size, finish=False)
        if return_probabilities:
            return prob
        t = prob if torch.is_tensor(prob) else torch.from_numpy(prob)
        classes = torch.nan_to_num(t, nan=-1.0).argmax(dim=1).masked_fill(torch.isnan(t).all(dim=1), -1)
        return self._like(classes, prob)

    def embed(self, x, lead_time: float | None = None, *, channels=None, allow_missing_channels: bool = False,
              overlap: int = 0, batch_size: int = 8):
        """[B, D, H/p, W/p]: the backbone's token of every whole patch of ``x`` [B, C_in, H, W] of any size,
        as a feature map (NaN for a patch with no valid value); see :meth:`embed_tiles`."""
        return self._whole("embed", self.model_channels_of(x, channels, allow_missing_channels),
                           {"lead_time": lead_time}, overlap, batch_size)

    def _whole(self, task: str, x, options: dict, overlap: int, batch_size: int, finish: bool = True):
        from dchag.inference.predict import predict_array
        out = predict_array(self, task, x, options, overlap=overlap, batch_size=batch_size, finish=finish)
        return torch.from_numpy(out) if torch.is_tensor(x) else out

    # ---- channels by identity --------------------------------------------------------------
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
    """The model at ``path`` (a consolidated export, or a training checkpoint: a ``--save`` folder or one
    of its ``iter_*`` folders, any layout) as a serial model on ``device`` (default: the GPU if
    there is one, else the CPU), in eval mode. No launcher needed: a 1-rank process group is
    created if the process has none."""
    model, config = read_model(path, build_serial_model, dtype)
    device = torch.device(device) if device is not None else default_device()
    model.to(device).eval()
    return PretrainedDChag(model, config, device)


def read_model(path: str, build, dtype: torch.dtype = torch.float32):
    """(``build(cfg)`` with its weights from ``path``, the export's config). An export: each parameter's
    piece only is read (safetensors slices; all of it for the serial model); a DeepSpeed checkpoint
    (any T, P, DP, ZeRO stage, fp32/bf16): its shards merged into full tensors as conversion does,
    and each parameter's piece kept. Config and weights are checked against each other first."""
    import os
    from dchag.parallel.state_dict import load_full_state_dict
    if consolidated.is_consolidated(path):
        _, config = consolidated.read(path, load=False)
    else:
        from dchag.checkpointing import convert, reader
        folder = reader.resolve_folder(path)
        reader.check_integrity(folder)
        config, _ = convert.run_config(folder)
    identity = {k: config[k] for k in ("channel_names", "wavelengths")  # exports made before the model recorded it
                if config["model"].get(k) is None and config.get(k) is not None}
    cfg = consolidated.config_from_dict(config["model"], bf16=dtype == torch.bfloat16, sequence_parallel=False,
                                        recompute_activations=False, **identity)
    model = build(cfg)
    names = [n for n, _ in model.named_parameters()]
    if consolidated.is_consolidated(path):
        from safetensors import safe_open
        weights = os.path.join(path, consolidated.WEIGHTS)
        with safe_open(weights, framework="pt") as f:
            held = set(f.keys())
            extra, missing = sorted(held - set(names)), sorted(set(names) - held)
            if missing or extra:
                raise CheckpointError(f"{weights} does not fit the model of its config.json: missing {missing[:3]}, "
                                      f"unexpected {extra[:3]}.")
            load_full_state_dict(model, {n: f.get_slice(n) for n in names})
        consolidated.refuse_non_finite(path, {n: p.detach() for n, p in model.named_parameters()})
    else:
        tensors, _ = reader.read_full_state_dict(folder, names)
        load_full_state_dict(model, tensors)
    return model, config
