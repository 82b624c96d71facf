"""Warmup + cosine/linear/constant decay, stepped by the loop (state = the iteration)."""

from __future__ import annotations

import math


class LRScheduler:
    def __init__(self, optimizer, max_lr: float, min_lr: float, warmup_iters: int, decay_iters: int, style: str):
        self.optimizer, self.max_lr, self.min_lr = optimizer, max_lr, min_lr
        self.warmup_iters, self.decay_iters, self.style = warmup_iters, max(decay_iters, 1), style
        self.num_steps = 0
        self._apply()

    def get_lr(self, step: int | None = None) -> float:
        s = self.num_steps if step is None else step
        if self.warmup_iters > 0 and s < self.warmup_iters:
            return self.max_lr * (s + 1) / self.warmup_iters
        if self.style == "constant":
            return self.max_lr
        frac = min(max(s - self.warmup_iters, 0) / max(self.decay_iters - self.warmup_iters, 1), 1.0)
        if self.style == "linear":
            coeff = 1.0 - frac
        else:
            coeff = 0.5 * (math.cos(math.pi * frac) + 1.0)
        return self.min_lr + coeff * (self.max_lr - self.min_lr)

    def _apply(self) -> None:
        lr = self.get_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self) -> None:
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "decay_iters": self.decay_iters, "style": self.style}

    def load_state_dict(self, sd: dict) -> None:
        self.num_steps = int(sd["num_steps"])
        self._apply()
