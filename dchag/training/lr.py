"""Warmup + cosine/linear/constant decay, stepped by the loop (state = the iteration).

On resume, Megatron's rules (``OptimizerParamScheduler``): the schedule's length is
``--lr-decay-iters`` (default ``--train-iters``); a checkpoint whose schedule (lr, min-lr, warmup,
decay iterations, style) differs from the command line is refused, naming both values, unless
``--use-checkpoint-opt-param-scheduler`` (keep the checkpoint's) or
``--override-opt-param-scheduler`` (take the command line's) is given."""

from __future__ import annotations

import math


# Schedule attributes and the flags that set them.
SCHEDULE_FLAGS = (("max_lr", "--lr"), ("min_lr", "--min-lr"), ("warmup_iters", "--lr-warmup-iters"),
                  ("decay_iters", "--lr-decay-iters"), ("style", "--lr-decay-style"))


class ScheduleError(ValueError):
    """A resume would change the LR schedule without being told to."""


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
            group["lr"] = lr * group.get("lr_mult", 1.0)  # megatron's per-group multiplier

    def step(self) -> None:
        self.num_steps += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"num_steps": self.num_steps, "max_lr": self.max_lr, "min_lr": self.min_lr,
                "warmup_iters": self.warmup_iters, "decay_iters": self.decay_iters, "style": self.style}

    def load_state_dict(self, sd: dict, use_checkpoint: bool = False, override: bool = False) -> list[str]:
        """Restore the step; the schedule per the rules above. Returns the differences found
        (``--flag checkpoint -> command line`` strings) that a flag resolved."""
        if use_checkpoint and override:
            raise ScheduleError("--use-checkpoint-opt-param-scheduler and --override-opt-param-scheduler exclude each "
                                "other; give one.")
        diffs = []
        for attr, flag in SCHEDULE_FLAGS:
            if attr in sd and sd[attr] != getattr(self, attr):
                diffs.append((attr, flag, sd[attr], getattr(self, attr)))
        if diffs and not (use_checkpoint or override):
            listed = "; ".join(f"{flag} {old} in the checkpoint, {new} on the command line" + (
                " (its default: --train-iters)" if attr == "decay_iters" else "") for attr, flag, old, new in diffs)
            raise ScheduleError(
                f"the checkpoint's LR schedule differs from the command line: {listed}. Resuming would silently "
                "change the schedule mid-run. Pass --use-checkpoint-opt-param-scheduler to keep the checkpoint's, "
                "--override-opt-param-scheduler to take the command line's, or give the checkpoint's values "
                "(e.g. --lr-decay-iters to lengthen --train-iters without stretching the decay).")
        if use_checkpoint:
            for attr, _, old, _ in diffs:
                setattr(self, attr, old)
        self.num_steps = int(sd["num_steps"])
        self._apply()
        return [f"{flag} {old} -> {new}" for _, flag, old, new in diffs]
