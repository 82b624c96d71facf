"""Iterations that update nothing: a non-finite loss or gradient norm (the update is skipped), or
a batch with no valid input value (nothing to learn from). Both count toward
``--max-consecutive-nan-iters``; no checkpoint is saved while a streak holds a non-finite
iteration (its weights are those from before the streak, and whatever made them blow up is not
worth resuming from); the stop message names the last checkpoint from before the streak.
"""

from __future__ import annotations

import math


class NonFiniteError(RuntimeError):
    """Too many consecutive iterations with a non-finite loss or gradient norm, or nothing to learn."""


def is_nonfinite(loss: float, grad_norm: float | None) -> bool:
    return not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(grad_norm))


class Streak:
    """The current run of iterations without an update, and the last checkpoint before it."""

    def __init__(self, limit: int, last_checkpoint: str | None = None):
        self.limit = limit  # 0: no limit
        self.last_checkpoint = last_checkpoint  # loaded or saved: the weights a resume would start from
        self.start = None
        self.nonfinite = self.empty = 0
        self.last_values = (float("nan"), None)  # loss and grad norm of the last non-finite iteration

    def update(self) -> None:
        """An iteration that updated the weights: the streak is over."""
        self.start, self.nonfinite, self.empty = None, 0, 0

    def skip(self, iteration: int, empty: bool, loss: float, grad_norm: float | None) -> None:
        """An iteration without an update; raises :class:`NonFiniteError` at the limit."""
        if self.start is None:
            self.start = iteration
        if empty:
            self.empty += 1
        else:
            self.nonfinite += 1
            self.last_values = (loss, grad_norm)
        n = self.nonfinite + self.empty
        if self.limit and n >= self.limit:
            raise NonFiniteError(self._stop_message(n, iteration))

    @property
    def blocks_saving(self) -> bool:
        return self.nonfinite > 0

    def saved(self, path: str) -> None:
        self.last_checkpoint = path

    def not_saved(self, iteration: int) -> str:
        """Why a save due at ``iteration`` is withheld."""
        return (f"not saved: iterations {self.start}-{iteration} include {self.nonfinite} with a non-finite loss or "
                f"gradient norm, so the weights are still those of "
                f"{self.last_checkpoint or 'the start of this run'}")

    def _stop_message(self, n: int, iteration: int) -> str:
        if not self.empty:
            loss, gn = self.last_values
            what = (f"had a non-finite loss or gradient norm (loss {loss}, grad norm {gn}); every one of those updates "
                    "was skipped")
        elif not self.nonfinite:
            what = "had no valid input value (every value NaN, Inf or no-data): nothing to learn from, no update"
        else:
            what = (f"made no update: {self.nonfinite} had a non-finite loss or gradient norm, {self.empty} no valid "
                    "input value")
        before = (f"the last checkpoint before it is {self.last_checkpoint}" if self.last_checkpoint else
                  "no checkpoint was saved before it")
        return (f"{n} consecutive iterations (up to {iteration}) {what}. Stopping without saving (nothing is saved "
                f"during such a streak, which began at iteration {self.start}); {before}. Lower --lr or "
                "--lr-warmup-iters, check the data (--data-strict), or raise --max-consecutive-nan-iters.")
