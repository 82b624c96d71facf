"""An independent reference of the D-CHAG ViT: plain PyTorch, float64, one process.

Written from the method's definition (shared/DESIGN.md section 1), in the style of ClimaX's
``arch.py``, and sharing no code with ``dchag/``: no megatron, no process groups, no fused or
padded tricks. Loops over groups and segments are explicit, so the arithmetic can be read off
the page. ``DChagViT`` at T = P = 1 must equal it in output, loss and every gradient
(tests/test_reference.py); the distributed-vs-serial suite then ties every layout to it.

    x [B, C, H, W]
      per-channel patch embedding     tok[b, c, l] = W_c . patch_l(x[b, c]) + b_c + e_c (+ s(lambda_c))  [B, C, L, D]
      partial aggregation (per group) linear: sum_i w_i tok_i    cross: learned-query attention  [B, G, L, D]
      (group norm: each group token layer-normalized over D, a scale and shift per group)
         (cross without projections: the query attends over the tokens themselves, keys = values = tokens)
         tree of k levels: level 1 reduces each of the 2^(k-1) sub-groups of a group, later levels pairs
      final aggregation               learned-query multi-head cross-attention over the G tokens [B, L, D]
      MAE: masked positions -> mask token;  + position embedding;  forecast: + lead-time embedding
      pre-norm ViT blocks, final norm                                                             [B, L, D]
      head  MAE: per-channel linear to p*p pixels [B, C, H, W];  forecast: linear to V*p*p [B, V, H, W]

Channels are cut into G contiguous groups whose sizes differ by at most one, the larger groups
first (13 channels over 4 groups: 4, 3, 3, 3); a group is cut the same way into 2^(k-1)
sub-groups at the first tree level.

A blend of data sources (``source``): the model's per-channel parameters have one row per channel
of the union of the sources, and the input holds one source's channels, ``source`` being their rows
(union ids) in the input's order. A source with fewer channels than the G 2^(k-1) first-level
segments is read as that many tokens, token i being channel floor(i C_s / (G 2^(k-1))) (each group
gets a share of the few channels); every token uses its channel's rows, and the MAE head predicts
one plane per token. Flat aggregation attends over the source's C_s tokens.

Parameters are read from ``DChagViT``'s full state dict through ``name_map`` (the only place
that knows the other side's names). Layout conventions of the other side that are part of its
checkpoint format, and so of the map:
- megatron's fused QKV weight [3D, D]: output rows ordered per head as [q | k | v] (hd rows each);
- the final aggregation's fused key/value weight [2D, D]: rows per head as [k | v];
- torch ``nn.Linear`` / megatron linear weights are [out, in]; the channel-stage's stacked
  matrices (tokenizer [C, D, p, p], partial key/value/proj [n, D_in, D_out]) act as x @ W.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ReferenceConfig:
    num_channels: int
    img_h: int
    img_w: int
    patch: int
    dim: int
    depth: int
    heads: int
    mlp_dim: int
    aggregation: str  # flat | linear | cross
    groups: int
    tree_levels: int
    task: str  # mae | forecast
    out_vars: tuple[int, ...]
    eps: float = 1e-5
    wavelengths: tuple | None = None  # --channel-embedding wavelength: each channel's wavelength (nm) or None
    cross_projections: str = "per-group"  # none: the group's query attends over the tokens themselves
    group_norm: str = "none"  # layernorm: each group token normalized over D, then a per-group scale and shift
    source: tuple[int, ...] | None = None  # a blend: the union row of each input channel, in the input's order


def token_channels(cfg: ReferenceConfig) -> list[tuple[int, int]]:
    """Per channel token: (its channel's position in the input, its parameter row)."""
    if cfg.source is None:
        return [(c, c) for c in range(cfg.num_channels)]
    n = len(cfg.source)
    need = 1 if cfg.aggregation == "flat" else cfg.groups * 2 ** (cfg.tree_levels - 1)
    positions = range(n) if n >= need else [i * n // need for i in range(need)]
    return [(c, cfg.source[c]) for c in positions]


def near_equal_sizes(n: int, parts: int) -> list[int]:
    """n items cut into `parts` contiguous runs whose sizes differ by at most one, larger first."""
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def segments_per_level(cfg: ReferenceConfig) -> list[list[int]]:
    """For each tree level, the number of input tokens of every output token, in order."""
    if cfg.aggregation == "flat":
        return []
    k = cfg.tree_levels
    fan = 2 ** (k - 1)
    level1 = [s for g in near_equal_sizes(len(token_channels(cfg)), cfg.groups) for s in near_equal_sizes(g, fan)]
    levels = [level1]
    for j in range(2, k + 1):
        levels.append([2] * (cfg.groups * 2 ** (k - j)))
    return levels


class ReferenceDChag(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.params: dict[str, torch.Tensor] = {}  # reference name -> float64 leaf tensor, filled by load()

    # ---- parameters -------------------------------------------------------------------
    def load(self, dchag_state: dict[str, torch.Tensor]) -> None:
        """Take DChagViT's full (layout-free) state dict through the name map, as float64."""
        for ours, theirs in name_map(self.cfg).items():
            self.params[ours] = dchag_state[theirs].detach().clone().double().requires_grad_(True)

    def grads_by_dchag_name(self) -> dict[str, torch.Tensor]:
        return {theirs: self.params[ours].grad for ours, theirs in name_map(self.cfg).items()}

    def p(self, name: str) -> torch.Tensor:
        return self.params[name]

    # ---- the channel stage --------------------------------------------------------------
    def patchify(self, img: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, L, p*p], patches in row-major order, pixels row-major inside."""
        B, C, H, W = img.shape
        p = self.cfg.patch
        x = img.reshape(B, C, H // p, p, W // p, p).permute(0, 1, 2, 4, 3, 5)
        return x.reshape(B, C, (H // p) * (W // p), p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, L, p*p] -> [B, C, H, W]."""
        B, C, L, _ = x.shape
        p, gh, gw = self.cfg.patch, self.cfg.img_h // self.cfg.patch, self.cfg.img_w // self.cfg.patch
        return x.reshape(B, C, gh, gw, p, p).permute(0, 1, 2, 4, 3, 5).reshape(B, C, gh * p, gw * p)

    def tokenize(self, img: torch.Tensor) -> torch.Tensor:
        patches = self.patchify(img)  # [B, C, L, p*p]
        tokens = []
        for c, row in token_channels(self.cfg):
            w = self.p("embed.w")[row].reshape(self.cfg.dim, -1)  # [D, p*p]
            tokens.append(patches[:, c] @ w.T + self.p("embed.b")[row] + self.p("embed.channel")[row]
                          + self.spectral_embedding(row))
        return torch.stack(tokens, dim=1)  # [B, tokens, L, D]

    def spectral_embedding(self, c: int) -> torch.Tensor:
        """Panopticon's fixed embedding of channel c's wavelength lambda (nm), [D]: feature k < D/2 is
        sin(lambda / 10000^(2k/D)), feature D/2 + k its cosine; zero without a wavelength (or without
        --channel-embedding wavelength)."""
        D = self.cfg.dim
        out = torch.zeros(D, dtype=torch.float64)
        lam = self.cfg.wavelengths[c] if self.cfg.wavelengths is not None else None
        if lam is not None:
            for k in range(D // 2):
                angle = lam / 10000 ** (2 * k / D)
                out[k], out[D // 2 + k] = math.sin(angle), math.cos(angle)
        return out

    def attend(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Multi-head attention of one learned query per position over N tokens.
        query [D]; keys, values [B, N, L, D] -> [B, L, D]."""
        B, N, L, D = keys.shape
        H = self.cfg.heads
        hd = D // H
        q = query.reshape(H, hd)
        k = keys.reshape(B, N, L, H, hd)
        v = values.reshape(B, N, L, H, hd)
        scores = (k * q).sum(-1) / math.sqrt(hd)  # [B, N, L, H]
        weights = torch.softmax(scores, dim=1)  # over the N tokens
        return (weights[..., None] * v).sum(1).reshape(B, L, D)

    def partial_aggregation(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, tokens, L, D] -> [B, G, L, D]."""
        rows = [row for _, row in token_channels(self.cfg)]  # the first level's coefficient of each token
        for j, sizes in enumerate(segments_per_level(self.cfg)):
            out, start = [], 0
            for n, size in enumerate(sizes):
                seg = tokens[:, start:start + size]  # [B, S, L, D]
                if self.cfg.aggregation == "linear":
                    w = self.p(f"agg{j}.coef")[rows[start:start + size] if j == 0 else slice(start, start + size)]
                    out.append((seg * w[None, :, None, None]).sum(1))
                elif self.cfg.cross_projections == "none":  # keys = values = the tokens, no output projection
                    out.append(self.attend(self.p(f"agg{j}.query")[n], seg, seg))
                else:
                    keys = seg @ self.p(f"agg{j}.key")[n]
                    values = seg @ self.p(f"agg{j}.value")[n]
                    mixed = self.attend(self.p(f"agg{j}.query")[n], keys, values)
                    out.append(mixed @ self.p(f"agg{j}.proj")[n] + self.p(f"agg{j}.proj_b")[n])
                start += size
            assert start == tokens.shape[1]
            tokens = torch.stack(out, dim=1)
        return tokens

    def final_aggregation(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, G, L, D] -> [B, L, D]: the learned query attends over the G tokens."""
        D, H = self.cfg.dim, self.cfg.heads
        hd = D // H
        kv = (tokens @ self.p("final.kv_w").T + self.p("final.kv_b")).reshape(*tokens.shape[:3], H, 2, hd)
        keys, values = kv[..., 0, :].reshape(tokens.shape), kv[..., 1, :].reshape(tokens.shape)
        mixed = self.attend(self.p("final.query"), keys, values)
        return mixed @ self.p("final.proj_w").T + self.p("final.proj_b")

    # ---- the ViT ------------------------------------------------------------------------
    def layer_norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.cfg.eps) * self.p(f"{name}.w") + self.p(f"{name}.b")

    def block(self, x: torch.Tensor, i: int) -> torch.Tensor:
        B, L, D = x.shape
        H = self.cfg.heads
        hd = D // H
        h = self.layer_norm(x, f"blocks{i}.norm1")
        qkv = (h @ self.p(f"blocks{i}.qkv_w").T + self.p(f"blocks{i}.qkv_b")).reshape(B, L, H, 3, hd)
        q, k, v = (qkv[:, :, :, j].transpose(1, 2) for j in range(3))  # [B, H, L, hd]
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
        o = (attn @ v).transpose(1, 2).reshape(B, L, D)
        x = x + o @ self.p(f"blocks{i}.proj_w").T + self.p(f"blocks{i}.proj_b")
        h = self.layer_norm(x, f"blocks{i}.norm2")
        h = F.gelu(h @ self.p(f"blocks{i}.fc1_w").T + self.p(f"blocks{i}.fc1_b"))  # exact (erf) GELU
        return x + h @ self.p(f"blocks{i}.fc2_w").T + self.p(f"blocks{i}.fc2_b")

    def forward(self, img: torch.Tensor, patch_mask: torch.Tensor | None = None,
                lead_time: torch.Tensor | None = None) -> torch.Tensor:
        img = img.double()
        tokens = self.tokenize(img)
        if self.cfg.aggregation != "flat":
            tokens = self.partial_aggregation(tokens)
        if self.cfg.group_norm == "layernorm":  # [B, G, L, D], over D, per group g: gamma_g, beta_g
            mean = tokens.mean(-1, keepdim=True)
            var = ((tokens - mean) ** 2).mean(-1, keepdim=True)
            tokens = ((tokens - mean) / torch.sqrt(var + self.cfg.eps) * self.p("groupnorm.w")[None, :, None, :]
                      + self.p("groupnorm.b")[None, :, None, :])
        x = self.final_aggregation(tokens)  # [B, L, D]
        if self.cfg.task == "mae":
            x = torch.where(patch_mask[..., None], self.p("mask_token")[0], x)
        x = x + self.p("pos_embed")[0]
        if self.cfg.task == "forecast":
            x = x + lead_time.double()[:, None, None] * self.p("lead.w")[:, 0] + self.p("lead.b")
        for i in range(self.cfg.depth):
            x = self.block(x, i)
        x = self.layer_norm(x, "norm")
        if self.cfg.task == "mae":
            rows = [row for _, row in token_channels(self.cfg)]  # one plane per channel token
            pixels = torch.einsum("bld,cqd->bclq", x, self.p("head.w")[rows]) + self.p("head.b")[rows][None, :, None, :]
            return self.unpatchify(pixels)  # [B, tokens, H, W]
        V = len(self.cfg.out_vars)
        pixels = (x @ self.p("head.w").T + self.p("head.b")).reshape(x.shape[0], x.shape[1], V, -1)
        return self.unpatchify(pixels.transpose(1, 2))  # [B, V, H, W]


# ---- losses, from their definitions ---------------------------------------------------------
def reference_mae_loss(pred, img, valid, patch_mask, patch: int) -> torch.Tensor:
    """Mean squared error over the pixels of masked patches that hold a valid value, all channels."""
    B, C, H, W = img.shape
    gh, gw = H // patch, W // patch
    masked_pixels = patch_mask.reshape(B, gh, gw).repeat_interleave(patch, 1).repeat_interleave(patch, 2)
    scored = masked_pixels[:, None].expand(B, C, H, W) & valid
    err = (pred.double() - img.double())[scored]
    return (err ** 2).sum() / max(int(scored.sum()), 1)


def reference_forecast_loss(pred, target, target_valid, lat_weights) -> torch.Tensor:
    """sum_{valid} w_lat (pred - target)^2 / sum_{valid} w_lat."""
    w = lat_weights.double()[:, None, :, None].expand(target.shape)[target_valid]
    err = (pred.double() - target.double())[target_valid]
    return (w * err ** 2).sum() / w.sum()


def latitude_weights(latitudes_deg) -> torch.Tensor:
    """cos(latitude), normalized to mean 1 over the rows."""
    w = torch.cos(torch.deg2rad(torch.as_tensor(latitudes_deg, dtype=torch.float64))).clamp_min(0)
    return w / w.mean()


# ---- the one place that knows DChagViT's parameter names -----------------------------------
def name_map(cfg: ReferenceConfig) -> dict[str, str]:
    """reference name -> DChagViT name."""
    m = {
        "embed.w": "tokenizer.weight",
        "embed.b": "tokenizer.bias",
        "embed.channel": "tokenizer.channel_embed",
        "final.query": "final.query",
        "final.kv_w": "final.kv.weight",
        "final.kv_b": "final.kv.bias",
        "final.proj_w": "final.proj.weight",
        "final.proj_b": "final.proj.bias",
        "pos_embed": "pos_embed",
        "norm.w": "backbone.final_layernorm.weight",
        "norm.b": "backbone.final_layernorm.bias",
    }
    for j in range(len(segments_per_level(cfg))):
        if cfg.aggregation == "linear":
            m[f"agg{j}.coef"] = f"partial.levels.{j}.weight"
        elif cfg.cross_projections == "none":
            m[f"agg{j}.query"] = f"partial.levels.{j}.query"
        else:
            for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value"), ("proj", "proj"),
                                 ("proj_b", "proj_bias")):
                m[f"agg{j}.{ours}"] = f"partial.levels.{j}.{theirs}"
    for i in range(cfg.depth):
        layer = f"backbone.layers.{i}"
        for ours, theirs in (("norm1", "input_layernorm"), ("norm2", "pre_mlp_layernorm")):
            m[f"blocks{i}.{ours}.w"], m[f"blocks{i}.{ours}.b"] = f"{layer}.{theirs}.weight", f"{layer}.{theirs}.bias"
        for ours, theirs in (("qkv", "self_attention.linear_qkv"), ("proj", "self_attention.linear_proj"),
                             ("fc1", "mlp.linear_fc1"), ("fc2", "mlp.linear_fc2")):
            m[f"blocks{i}.{ours}_w"], m[f"blocks{i}.{ours}_b"] = f"{layer}.{theirs}.weight", f"{layer}.{theirs}.bias"
    if cfg.group_norm == "layernorm":
        m.update({"groupnorm.w": "group_norm.weight", "groupnorm.b": "group_norm.bias"})
    if cfg.task == "mae":
        m.update({"mask_token": "mask_token", "head.w": "head.weight", "head.b": "head.bias"})
    else:
        m.update({"lead.w": "lead_time_embed.weight", "lead.b": "lead_time_embed.bias",
                  "head.w": "head.linear.weight", "head.b": "head.linear.bias"})
    return m
