"""The error every checkpoint check raises: both the checkpointing layer and training (which
turns it into a one-line message and exit status 1) import it from here."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved, loaded or converted; the message names the problem and the fix."""
