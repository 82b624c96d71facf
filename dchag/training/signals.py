"""Stopping a run on purpose: ``--exit-signal-handler`` / ``--exit-signal`` / ``--exit-duration-in-mins``
(Megatron's flags), and Ctrl-C without a handler ending in one line per rank.

A handled signal only sets a flag; the loop asks :meth:`ExitRequest.check` at every iteration
boundary, which all-reduces (MAX) a two-element flag over every rank, so all ranks stop after the
same iteration even when the signal reached only some of them (SLURM signals every task; a
``kill`` may reach one). The loop then saves a checkpoint and returns normally (exit status 0).
"""

from __future__ import annotations

import signal
import sys
import time

import torch
import torch.distributed as dist

SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2")

# What the loop has reached, for the one-line message on an unhandled SIGINT.
progress = {"iteration": 0, "saved": None}


class ExitRequest:
    def __init__(self, args, start_time: float):
        self.signame = args.exit_signal if args.exit_signal_handler else None
        self.minutes = args.exit_duration_in_mins
        self.deadline = None if not self.minutes else start_time + 60.0 * self.minutes
        self.received = False
        self._previous = None

    @property
    def active(self) -> bool:
        return self.signame is not None or self.deadline is not None

    def install(self) -> "ExitRequest":
        if self.signame is not None:
            self._previous = signal.signal(getattr(signal, self.signame), self._on_signal)
        return self

    def restore(self) -> None:
        """Put the previous handler back, unless the signal came: then the process is stopping, and
        a repeat (a second Ctrl-C; SLURM signals every process of a step) must not break the
        teardown with a KeyboardInterrupt. It is noted and ignored."""
        if self._previous is not None:
            signal.signal(getattr(signal, self.signame), self._on_repeat if self.received else self._previous)
            self._previous = None

    def _on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.received = True

    def _on_repeat(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        print(f"received {self.signame} again while stopping: the stop goes on", file=sys.stderr, flush=True)

    def check(self) -> str | None:
        """Why every rank stops now (None: go on). Collective when a handler or a duration is set."""
        if not self.active:
            return None
        from dchag.training.logging_utils import comm_device
        late = self.deadline is not None and time.time() >= self.deadline
        flags = torch.tensor([int(self.received), int(late)], dtype=torch.int32, device=comm_device())
        if dist.is_initialized():
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        if flags[0].item():
            return f"received {self.signame} (--exit-signal-handler)"
        if flags[1].item():
            return f"--exit-duration-in-mins {self.minutes:g} reached"
        return None


def interrupted_line() -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    saved = progress["saved"]
    since = f"last checkpoint {saved}" if saved else "no checkpoint saved by this run"
    return (f"rank {rank}: interrupted (SIGINT) at iteration {progress['iteration']}; stopping ({since}). "
            "To save on a signal, run with --exit-signal-handler [--exit-signal SIGINT].")


def exit_interrupted() -> None:
    """End the process after an unhandled SIGINT: one line, status 130, no teardown (a peer may
    already be gone, and tearing down gloo groups against a dead peer can hang or abort)."""
    import os
    from dchag.checkpointing.lock import release_held
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not print a traceback either
    release_held()  # the --save lock (os._exit skips atexit)
    print(interrupted_line(), file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(130)
