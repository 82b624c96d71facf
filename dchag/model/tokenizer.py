"""Per-channel patch embedding (ClimaX-style), built for the channels a rank owns only."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dchag.model.bank import RowPlan, lend, take
from dchag.model.init import init_rows_, mark_channel_sharded, mark_weight_matrix


class ChannelTokenizer(nn.Module):
    """x [B, c, H, W] -> tokens [B, c, L, D] for the c channels (slots) this rank tokenizes.

    Every channel has its own patch-embedding weights, stored stacked as ``weight`` [n, D, p, p]
    (+ ``bias`` [n, D]) and applied as one grouped convolution, plus a learned channel
    embedding [n, D] that tells the aggregation which channel a token came from. The n rows are
    those of ``channels``: with one data source the rank's channels, which are also its input; in
    a blend the union ids whose rows the rank holds (its home ids), from which ``plans[source]``
    takes the rows of the source's slots (dchag/model/bank.py: rows borrowed from other ranks
    included).
    ``wavelengths`` (--channel-embedding wavelength: the wavelengths in nm, None for a channel
    without one) adds a fixed buffer ``wavelength_embed`` (:func:`wavelength_sincos`) to the
    learned embedding, so a band the model never saw starts near its spectral neighbours; one row
    per channel, or in a blend per row ``wavelength_slots[source]`` names for each slot.
    """

    def __init__(self, channels: range | tuple[int, ...], num_channels: int, hidden_size: int, patch_dim: int,
                 seed: int, owner: bool = True, wavelengths: list[float | None] | None = None,
                 plans: tuple[RowPlan, ...] | None = None, wavelength_slots: tuple[tuple[int, ...], ...] | None = None):
        super().__init__()
        if wavelengths is not None:  # derived from the config, so not saved (persistent=False)
            self.register_buffer("wavelength_embed", wavelength_sincos(wavelengths, hidden_size), persistent=False)
        else:
            self.wavelength_embed = None
        self.wavelength_slots = wavelength_slots
        c, D, p = len(channels), hidden_size, patch_dim
        self.channels, self.hidden_size, self.patch_dim = channels, D, p
        self.plans = plans or (RowPlan.whole(c),)
        self.weight = nn.Parameter(torch.empty(c, D, p, p))
        self.bias = nn.Parameter(torch.zeros(c, D))
        self.channel_embed = nn.Parameter(torch.empty(c, D))
        init_rows_(self.weight, channels, seed, "tokenizer.weight", std=1.0 / math.sqrt(p * p))
        init_rows_(self.channel_embed, channels, seed, "tokenizer.channel_embed", std=0.02)
        for param in (self.weight, self.bias, self.channel_embed):
            mark_channel_sharded(param, channels, num_channels, owner, identity=True)
        mark_weight_matrix(self.weight)

    def borrows(self, source: int) -> bool:
        """Whether data ``source`` needs rows of other ranks (then ``self(None, source=...)`` lends them)."""
        return self.plans[source].num_borrowed > 0

    def forward(self, x: torch.Tensor | None, slots: range | None = None, grad_sink=None,
                mix: tuple | None = None, source: int = 0, borrowed: list | None = None):
        """x [B, c, H, W] -> [B, c, L, D]: the rank's slots of data ``source`` (one source: its channels).

        For the streamed channel stage (dchag/model/streaming.py): ``slots``: which of the rank's
        slots x holds (default all of them); ``mix = (sizes, coefficients)``: return sum_i w_i token_i
        over consecutive runs of ``sizes`` channels instead, [B, len(sizes), L, D] (fp32 or wider),
        see :meth:`_mixed`; ``x=None``: the rows this rank borrows for ``source`` (one collective,
        dchag/model/bank.py), which each chunk then takes as ``borrowed``.
        The parameters are sliced here, inside the module's forward, so ZeRO-3 has gathered them
        (through ``grad_sink`` when streamed: one full-size gradient for all chunks)."""
        if not 0 <= source < len(self.plans):
            raise ValueError(f"data source {source} outside the tokenizer's {len(self.plans)} source(s)")
        plan, params = self.plans[source], (self.weight, self.bias, self.channel_embed)
        if x is None:
            return lend(params, plan)
        if borrowed is None and grad_sink is None:
            borrowed = lend(params, plan)
        rows = slots if slots is not None else range(plan.num_slots)
        B, c, H, W = x.shape
        if c != len(rows) or rows.stop > plan.num_slots:
            raise ValueError(f"tokenizer takes {plan.num_slots} channels (slots) of data source {source} on this rank; "
                             f"expected input for its slots {rows}, got {c} channels")
        weight, bias, embed = (take(t, plan, rows, None if borrowed is None else b, grad_sink)
                               for t, b in zip(params, borrowed or params))
        if self.wavelength_embed is not None:
            if self.wavelength_slots is None:
                fixed = self.wavelength_embed[rows.start:rows.stop]
            else:
                fixed = self.wavelength_embed[list(self.wavelength_slots[source][rows.start:rows.stop])]
            embed = embed + fixed.to(embed.dtype)
        if mix is not None:
            return self._mixed(x, weight, bias + embed, *mix)
        D, p = self.hidden_size, self.patch_dim
        # groups=c: output channels [i*D, (i+1)*D) see input channel i only.
        y = F.conv2d(x.to(weight.dtype), weight.reshape(c * D, 1, p, p), bias.reshape(c * D), stride=p, groups=c)
        y = y.reshape(B, c, D, -1).transpose(2, 3)  # [B, c, L, D]
        return y + embed[:, None, :]

    def _mixed(self, x: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, sizes: tuple[int, ...],
               coefficients: torch.Tensor) -> torch.Tensor:
        """D-CHAG-L's partial sums without building a token: per run of channels,

            sum_i w_i (W_i * x_i + b_i + e_i) = (sum_i w_i W_i) * x_i + sum_i w_i (b_i + e_i),

        one convolution with s input channels and weight [D, s, p, p] = (w_i W_i) transposed.
        x [B, k, H, W]; weight [k, D, p, p]; shift (b + e) [k, D]; coefficients w [k].
        Returns [B, len(sizes), L, D], fp32 or wider (summed over chunks)."""
        out, start = [], 0
        for s in sizes:
            rows = slice(start, start + s)
            w = coefficients[rows].to(weight.dtype)
            kernel = (weight[rows] * w[:, None, None, None]).transpose(0, 1)  # [D, s, p, p]
            y = F.conv2d(x[:, rows].to(weight.dtype), kernel, w @ shift[rows], stride=self.patch_dim)  # [B, D, h, w]
            out.append(y.flatten(2).transpose(1, 2))  # [B, L, D]
            start += s
        sums = torch.stack(out, 1)
        return sums.to(torch.promote_types(sums.dtype, torch.float32))


def wavelength_sincos(wavelengths: list[float | None], hidden_size: int) -> torch.Tensor:
    """The fixed spectral embedding of --channel-embedding wavelength (Panopticon's / DOFA's), [c, D]:

        e(lambda)[k] = sin(lambda w_k),  e(lambda)[D/2 + k] = cos(lambda w_k),  w_k = 1 / 10000^(2k / D),

    k = 0 .. D/2 - 1, lambda in nm; a zero row for a channel without a wavelength (and a zero last
    column when D is odd). Close wavelengths get close rows: the learned channel embedding is added to it.
    Kept in float64 (cast where it is added), so the float64 reference comparison sees no float32 rounding."""
    half = hidden_size // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64) * 2 / hidden_size)  # [D/2]
    out = torch.zeros(len(wavelengths), hidden_size, dtype=torch.float64)
    for i, lam in enumerate(wavelengths):
        if lam is not None:
            angles = float(lam) * omega
            out[i, :half], out[i, half:2 * half] = angles.sin(), angles.cos()
    return out
