"""``pretrain()``: the entry point of ``pretrain_dchag.py``.

    the command line -> where this process sits (torchrun, the deepspeed launcher, srun, or one
    process: dchag.training.launch) -> the pre-flight (every check that needs no process group,
    every problem at once: dchag.training.preflight) -> the run (dchag.training.loop)

Nothing heavy is imported before the pre-flight has passed: a wrong command fails in about a second.

Exit status of every rank: 0 after a finished run, a handled stop signal (``--exit-signal-handler``)
or ``--exit-interval``; 1 for a user error (one message naming every problem, printed once per
node before the ranks meet, by rank 0 after); 130 for Ctrl-C without ``--exit-signal-handler`` (the
rank's line printed at once by the signal handler: dchag/training/signals.py).
"""

from __future__ import annotations

import os
import sys
import time

from dchag.training import launch, preflight


def _user_errors() -> tuple:
    """The errors that end a run with one message and exit status 1 (the ones importable now:
    before the run starts, torch and its modules need not be loaded)."""
    from dchag.checkpointing.errors import CheckpointError
    from dchag.data.errors import DataError
    from dchag.parallel.partition import LayoutError
    types = [preflight.PreflightError, preflight.ConfigError, LayoutError, DataError, CheckpointError,
             launch.LaunchError]
    for module, names in (("dchag.transfer.errors", ("FinetuneError",)),  # imported by a fine-tune's check
                          ("dchag.training.loop", ("USER_ERRORS",))):
        if module in sys.modules:
            for name in names:
                found = getattr(sys.modules[module], name)
                types += list(found) if isinstance(found, tuple) else [found]
    return tuple(types)


SILENT_RANK_GRACE_S = 10


def _fail(error: Exception, before_start: bool) -> None:
    """One message (before the start: per node, since any node may see its own problem; after:
    rank 0), exit status 1."""
    if before_start:
        show = os.environ.get("LOCAL_RANK", "0") == "0"
    else:
        import torch.distributed as dist
        show = not dist.is_initialized() or dist.get_rank() == 0
    if show:
        print(f"error: {error}", file=sys.stderr, flush=True)
    elif before_start:
        # torchrun stops every worker as soon as one exits. A silent rank that got here first would
        # get the node's printing rank killed before it prints (seen under load: exit 1, no
        # message). The printing rank runs the same checks, so it arrives within seconds; when it
        # exits, torchrun ends this sleep too, so a wrong command costs no extra time there.
        time.sleep(SILENT_RANK_GRACE_S)
    sys.exit(1)


def pretrain(model_provider, forward_step, datasets_provider, argv=None, non_loss_data_func=None,
             eval_metrics_func=None, loss_weight_func=None) -> dict:
    """Parse the command line, run, turn user errors into one message + exit status 1.

    Optional callbacks:
    - ``non_loss_data_func(model, valid_factory, args, cfg, iteration, writer)`` runs once after
      training on every rank (megatron's name for evaluation outputs that are not a loss, e.g.
      pictures);
    - ``eval_metrics_func(sums, args, valid_factory) -> {name: float}`` turns the summed
      evaluation statistics of ``forward_step`` into figures, printed on the validation line
      and written to TensorBoard as ``val/<name>``;
    - ``loss_weight_func(batch, args) -> float64 tensor | None``: a micro-batch's loss weight; with
      it the training loss is pooled over the global batch (``loop._pool_loss_over_global_batch``)."""
    import signal

    from dchag.training.signals import exit_interrupted, install_interrupt_handler
    previous = install_interrupt_handler()  # Ctrl-C: the rank's line at once, whatever runs (signals.py)
    try:
        return _pretrain(model_provider, forward_step, datasets_provider, argv, non_loss_data_func,
                         eval_metrics_func, loss_weight_func)
    except KeyboardInterrupt:  # raised by other means than the handler: one line per rank, no traceback
        exit_interrupted()
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)


def _pretrain(model_provider, forward_step, datasets_provider, argv, non_loss_data_func, eval_metrics_func,
              loss_weight_func) -> dict:
    from dchag.arguments import parse_args
    from megatron_patches.optional import quiet
    quiet()  # megatron-core's notes about absent optional libraries: the run prints one line instead
    args = parse_args(argv)
    try:
        launch.resolve()
        launch.use_environment_extensions_dir()  # before DeepSpeed builds its op
        found = preflight.run(args)
    except Exception as e:  # noqa: BLE001 - only user errors are turned into a message
        if not isinstance(e, _user_errors()):
            raise
        _fail(e, before_start=True)
    from dchag.training import loop
    try:
        return loop.run(args, model_provider, forward_step, datasets_provider, non_loss_data_func,
                        eval_metrics_func, loss_weight_func, found=found)
    except loop.USER_ERRORS as e:
        _fail(e, before_start=False)
