"""Why does a model sit on the MAE plateau? Measure the channel stage at initialization and while
training (T = P = 1, one process, plain torch AdamW with the study's schedule; no DeepSpeed).

For each aggregation it prints, at iteration 0 and every --every iterations:

  loss        the MAE loss of the training batch (mean over the last --every iterations)
  content     rms over visible positions of the channel stage's output minus its batch mean
              (the part of the token that depends on the image)
  pos         rms of the position embedding the content is added to
  ratio       content / pos: how much of the backbone's input is image, not position
  H(partial)  mean attention entropy of the CrossReduce levels over log(segment size)
              (1 = uniform attention over the group's channels, 0 = one channel)
  H(final)    the same for the final aggregation over its N tokens
  |g| ...     gradient norms of the tokenizer, partial stage, final aggregation and backbone

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 MASTER_PORT=29611 .venv/bin/python tools/aggregation_diagnostics.py \\
        --methods flat,linear,cross --iters 300 --every 50

Model and data are section 1 of docs/PARITY.md (synthetic:num_images=2000, 32 channels, 16 x 16
tiles, patch 4, mask 0.5, 2 layers, hidden 64, 4 heads, G = 8, batch 16, lr 3e-3 cosine to 1e-4).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402


def _entropy(scores: torch.Tensor, dim: int = -1) -> float:
    p = scores.softmax(dim)
    h = -(p * p.clamp_min(1e-30).log()).sum(dim)
    return float(h.mean() / math.log(scores.shape[dim]))


def _attention_entropies(model, tokens: torch.Tensor) -> tuple[float | None, float]:
    """Recompute the aggregation attentions' scores from their parameters (no forward hooks into
    the modules' internals): partial levels' mean normalized entropy, and the final one's."""
    from dchag.model.aggregation import CrossReduce, _segments
    hs = []
    x = tokens
    if hasattr(model.partial, "levels"):
        for level in model.partial.levels:
            if isinstance(level, CrossReduce):
                seg, _ = _segments(x, level.level.sizes)  # [B, n, S, L, D]
                B, n, S, L, D = seg.shape
                H, hd = level.num_heads, D // level.num_heads
                k = torch.einsum("bnsld,nde->bnlse", seg, level.key).reshape(B, n, L, S, H, hd)
                scores = torch.einsum("nhe,bnlshe->bnlhs", level.query.reshape(n, H, hd), k) / math.sqrt(hd)
                hs.append(_entropy(scores))
            x = level(x)
    B, N, L, D = x.shape
    f = model.final
    kv, _ = f.kv(x.permute(1, 0, 2, 3).reshape(N, B * L, D))
    k = kv.reshape(N, B * L, f.heads_local, 2, f.head_dim)[..., 0, :]
    scores = torch.einsum("he,nbhe->bhn", f.query.reshape(f.heads_local, f.head_dim), k) / math.sqrt(f.head_dim)
    return (sum(hs) / len(hs) if hs else None), _entropy(scores)


def _grad_norms(model) -> dict:
    out = {}
    for part in ("tokenizer", "partial", "final", "backbone", "head"):
        sq = sum(float(p.grad.pow(2).sum()) for n, p in model.named_parameters()
                 if n.startswith(part + ".") and p.grad is not None)
        out[part] = math.sqrt(sq)
    return out


def run(method: str, args) -> None:
    from megatron.core import parallel_state as ps, tensor_parallel

    import megatron_patches
    from dchag.data import build_datasets
    from dchag.model.config import DChagConfig
    from dchag.model.init import is_weight_matrix
    from dchag.model.vit import DChagViT
    from dchag.tasks import mae_loss, patch_mask

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    megatron_patches.initialize_model_parallel_with_channels(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    torch.manual_seed(args.seed)
    cfg = DChagConfig(num_channels=32, img_h=16, img_w=16, patch_dim=4, hidden_size=64, num_layers=2,
                      num_attention_heads=4, aggregation=method, groups=8, init_seed=args.seed,
                      attention_backend="unfused")
    model = DChagViT(cfg)
    query_std, kv_std, proj_std = args.query_std, args.final_std, args.final_std
    partial_std = args.partial_std
    if args.legacy_init:  # the initialization before docs/PARITY.md's "Init" (same distributions, other draws)
        query_std, kv_std, proj_std = 1.0, 0.02, 0.02 / math.sqrt(2 * cfg.num_layers)
        partial_std = 1.0 / math.sqrt(cfg.hidden_size)
    gen_init = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():  # ablations of the initialization (this tool only; not layout-independent)
        for name, p in model.named_parameters():
            std = {"final.kv.weight": kv_std, "final.proj.weight": proj_std}.get(name)
            if name.endswith("query"):
                std = query_std
            if name.startswith("partial.") and name.endswith((".value", ".proj")):
                std = partial_std
            if std is not None:
                p.copy_(torch.randn(p.shape, generator=gen_init) * std)
    train, _ = build_datasets("synthetic:num_images=2000", task="mae", img_h=16, img_w=16, num_channels=32,
                              valid_fraction=0.1, seed=1234)
    decay = [p for p in model.parameters() if is_weight_matrix(p)]
    rest = [p for p in model.parameters() if not is_weight_matrix(p)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    pos_rms = float(model.pos_embed.detach().pow(2).mean().sqrt())
    print(f"== {method}  (pos rms {pos_rms:.3f})", flush=True)
    print(f"{'iter':>5} {'loss':>7} {'content':>8} {'ratio':>7} {'H(part)':>8} {'H(final)':>8} "
          f"{'|g|tok':>8} {'|g|part':>8} {'|g|final':>8} {'|g|bb':>8}", flush=True)
    losses = []
    for it in range(args.iters + 1):
        warm = 50
        lr = args.lr * it / warm if it < warm else \
            1e-4 + 0.5 * (args.lr - 1e-4) * (1 + math.cos(math.pi * (it - warm) / max(1, args.iters - warm)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(len(train), (16,), generator=gen)
        samples = [train[int(i)] for i in idx]
        images = torch.stack([s["images"] for s in samples])
        valid = torch.stack([s["valid"] for s in samples])
        index = torch.stack([s["index"] for s in samples])
        images = torch.where(valid, images, torch.zeros_like(images))
        mask = patch_mask(index, cfg.num_patches, 0.5, args.seed, it)
        report = it % args.every == 0
        if report:
            with torch.no_grad():
                tokens = model.tokenizer(images)
                content = model.aggregate_channels(images)  # [B, L, D]
                dev = (content - content.mean(0, keepdim=True))[~mask]
                content_rms = float(dev.pow(2).mean().sqrt())
                h_part, h_final = _attention_entropies(model, tokens)
        opt.zero_grad()
        loss = mae_loss(model(images, patch_mask=mask), images, valid, mask, cfg.grid, cfg.patch_dim)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        losses.append(float(loss.detach()))
        if report:
            g = _grad_norms(model)
            hp = "-" if h_part is None else f"{h_part:.3f}"
            print(f"{it:5d} {sum(losses) / len(losses):7.4f} {content_rms:8.4f} {content_rms / pos_rms:7.4f} "
                  f"{hp:>8} {h_final:8.3f} {g['tokenizer']:8.2e} {g['partial']:8.2e} {g['final']:8.2e} "
                  f"{g['backbone']:8.2e}", flush=True)
            losses = []
        opt.step()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="flat,linear,cross")
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--every", type=int, default=50)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--query-std", type=float, default=None,
                   help="ablation: redraw every aggregation query from N(0, std^2) (the old init: 1)")
    p.add_argument("--final-std", type=float, default=None,
                   help="ablation: redraw the final aggregation's kv and proj weights from N(0, std^2) "
                        "(the old init: 0.02; its proj had 0.01)")
    p.add_argument("--partial-std", type=float, default=None,
                   help="ablation: redraw D-CHAG-C's partial value and output projections from N(0, std^2) "
                        "(before the identity init: 1/sqrt(D) = 0.125)")
    p.add_argument("--legacy-init", action="store_true",
                   help="the first init: queries N(0, 1), final kv N(0, 0.02^2), final proj N(0, (0.02/sqrt(2 layers))^2), "
                        "partial value and proj N(0, 1/D)")
    args = p.parse_args()
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29611")
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=0, world_size=1)
    for method in args.methods.split(","):
        run(method, args)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
