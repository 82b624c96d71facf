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


def test_megatron_notes_about_absent_libraries_become_one_start_up_line(monkeypatch):
    """megatron-core 0.16's UserWarnings for absent Apex / Transformer Engine (and its own deprecated
    default) are filtered; other warnings pass; one line names what is absent and what stands in."""
    import importlib.util
    import warnings
    from megatron_patches import optional
    notes = ["Transformer Engine and Apex are not installed. Falling back to Torch optimizers.",
             "Apex is not installed. Falling back to Torch Norm",
             "full scope is deprecated. Use empty cuda_graph_scope to capture the whole layer."]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        optional.quiet()
        for note in notes + ["something else"]:
            warnings.warn(note, UserWarning)
    assert [str(w.message) for w in seen] == ["something else"]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None if name == "apex" else object())
    assert optional.startup_line() == ("> optional libraries absent: Apex; in their place: " + optional.FALLBACKS)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert optional.startup_line() is None
