"""What a blended run says per source: the training loss of each source over the log interval
(``loss/<source>``), the realized share of each source in the samples consumed so far, and the
held-out loss of each source (``val loss/<source>``): log-line fields and TensorBoard scalars.

A step reads one source (dchag/data/blend.py), so a source's interval loss is the mean of the
losses of its steps in the interval (left out when it had none); its realized share is the share of
the steps (= of the consumed samples) it got since the start of the run, resumes included.
"""

from __future__ import annotations

import math


class SourceMeter:
    """Per-source figures of a blended run (None for one source: ``SourceMeter.of(args)``)."""

    def __init__(self, data_sources):
        from dchag.data.blend import BlendSchedule
        self.names = [str(s["name"]) for s in data_sources]
        self.schedule = BlendSchedule([s["weight"] for s in data_sources])
        self._sum = [0.0] * len(self.names)
        self._count = [0] * len(self.names)

    @classmethod
    def of(cls, args) -> "SourceMeter | None":
        sources = getattr(args, "data_sources", None)
        return cls(sources) if sources else None

    def step(self, iteration: int, loss: float | None) -> None:
        """Step ``iteration`` (1-based, done) and its loss (None: skipped, left out as Megatron does)."""
        if loss is None:
            return
        s = self.schedule.source_at(iteration - 1)
        self._sum[s] += loss
        self._count[s] += 1

    def interval(self, iteration: int) -> dict:
        """{"loss/<source>": mean over its steps in the interval (only the sources that had one),
        "share/<source>": realized share of the steps 1..iteration}; resets the interval."""
        out = {f"loss/{n}": self._sum[s] / self._count[s] for s, n in enumerate(self.names) if self._count[s]}
        out.update({f"share/{n}": share for n, share in zip(self.names, self.schedule.shares(iteration))})
        self._sum = [0.0] * len(self.names)
        self._count = [0] * len(self.names)
        return out

    @staticmethod
    def log_fields(figures: dict) -> str:
        """' loss/a: 1.234567E-01 | ... | share a: 40.0 % | ...' for the log line."""
        parts = [f" {k}: {v:.6E} |" for k, v in figures.items() if k.startswith("loss/")]
        parts += [f" share {k[len('share/'):]}: {100 * v:.1f} % |" for k, v in figures.items() if k.startswith("share/")]
        return "".join(parts)

    @staticmethod
    def write(writer, figures: dict, iteration: int) -> None:
        """TensorBoard: ``loss/<source>`` and ``blend-share/<source>``."""
        for k, v in figures.items():
            writer.add_scalar(k if k.startswith("loss/") else "blend-share/" + k[len("share/"):], v, iteration)


def val_losses(sums: dict, names) -> dict:
    """{"val loss/<source>": pooled held-out loss of the source} from the evaluation's summed
    ``loss_sums/<source>`` (the loop keys each micro-batch's sums by its source)."""
    out = {}
    for n in names:
        total = sums.get(f"loss_sums/{n}")
        out[f"val loss/{n}"] = float(total[0] / total[1]) if total is not None and total[1] > 0 else math.nan
    return out
