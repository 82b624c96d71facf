"""The invalid-value count on the log line: every value counted once, whatever the layout."""

from __future__ import annotations

import torch

from tests.distributed import run_distributed


def _count_worker():
    import torch.distributed as dist

    from dchag.training.logging_utils import invalid_input_values, log_line
    from tests.model_cases import setup_layout
    rank = dist.get_rank()
    out = {}
    for tp, cp in ((2, 2), (2, 1), (1, 1)):
        setup_layout(tp, cp)
        # P = 2: the two ranks hold different channels (3 and 5 invalid values); P = 1 with
        # T = 2: both hold all channels of the same sample (4 each, the same 4); T = 1: DP = 2,
        # different samples (3 and 5).
        local = {(2, 2): (3, 5), (2, 1): (4, 4), (1, 1): (3, 5)}[(tp, cp)][rank]
        out[(tp, cp)] = invalid_input_values(torch.tensor(local))
    out["line"] = log_line(1, 2, 4, 1.0, 1e-3, 4, 0.5, 0.1, 4.0, 100.0, 0, 0, out[(2, 2)])
    return out


def test_invalid_values_counted_once_per_value():
    for r in run_distributed(_count_worker, 2):
        assert (r[(2, 2)], r[(2, 1)], r[(1, 1)]) == (8, 4, 8)
        assert r["line"].endswith("number of invalid input values: 8 |")
