"""Stopping a run on purpose: ``--exit-signal-handler`` / ``--exit-signal`` / ``--exit-duration-in-mins``
(Megatron's flags), and Ctrl-C without a handler ending in one line per rank.

Ctrl-C without a handler: ``pretrain()`` installs :func:`install_interrupt_handler` first thing.
The first SIGINT prints the rank's line at once, from the handler, then the process exits (130):
nothing runs between the signal and the line. Under torchrun a second Ctrl-C makes the agent send
SIGTERM to its workers (and SIGKILL 30 s later); when the line waited for the KeyboardInterrupt to
unwind (a cleanup blocked on a peer that had already exited), that SIGTERM killed rank 0 before it
printed. The module imports no torch (the handler is installed before the pre-flight).

A handled signal only sets a flag; the loop asks :meth:`ExitRequest.check` at every iteration
boundary, which all-reduces (MAX) a two-element flag over every rank, so all ranks stop after the
same iteration even when the signal reached only some of them (SLURM signals every task; a
``kill`` may reach one). The loop then saves a checkpoint and returns normally (exit status 0).
"""

from __future__ import annotations

import os
import signal
import sys
import time

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
        import torch
        import torch.distributed as dist
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


def _rank() -> int:
    """This process's rank: the process group's, else the launcher's (RANK), before one exists."""
    if "torch.distributed" in sys.modules:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank()
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() else 0


def interrupted_line() -> str:
    saved = progress["saved"]
    since = f"last checkpoint {saved}" if saved else "no checkpoint saved by this run"
    return (f"rank {_rank()}: interrupted (SIGINT) at iteration {progress['iteration']}; stopping ({since}). "
            "To save on a signal, run with --exit-signal-handler [--exit-signal SIGINT].")


def exit_interrupted() -> None:
    """End the process after an unhandled SIGINT: one line, status 130, no teardown (a peer may
    already be gone, and tearing down gloo groups against a dead peer can hang or abort). The line
    comes first, written straight to the file descriptor (a signal may have interrupted a print),
    and neither a second Ctrl-C nor the launcher's SIGTERM can stop it: both are ignored from here."""
    for name in ("SIGINT", "SIGTERM"):  # first: a second Ctrl-C arriving during an import below would
        signal.signal(getattr(signal, name), signal.SIG_IGN)  # re-enter this handler mid-import (ImportError)
    try:
        sys.stdout.flush()
    except Exception:  # noqa: BLE001 - the signal may have interrupted a write to stdout
        pass
    try:
        os.write(2, (interrupted_line() + "\n").encode())
        from dchag.checkpointing.lock import release_held
        release_held()  # the --save lock (os._exit skips atexit)
    finally:
        os._exit(130)


def _on_interrupt(signum, frame) -> None:  # noqa: ARG001 - signal handler signature
    exit_interrupted()


def install_interrupt_handler():
    """Ctrl-C ends the process with its line at once (:func:`exit_interrupted`); returns the previous
    SIGINT handler (``pretrain()`` puts it back when it returns), None when none was installed. ``--exit-signal-handler
    --exit-signal SIGINT`` replaces it while the loop runs (:class:`ExitRequest`)."""
    import threading
    if threading.current_thread() is not threading.main_thread():  # only the main thread handles signals
        return None
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # started with SIGINT ignored (nohup, a background job): left so
        return None
    signal.signal(signal.SIGINT, _on_interrupt)
    return previous
