"""The one error of a fine-tune that cannot start."""


class FinetuneError(ValueError):
    """A fine-tune that cannot start (--finetune --pretrained-checkpoint); the message names the
    problem and the fix."""
