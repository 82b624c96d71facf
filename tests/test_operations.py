"""Cluster operations: the DeepSpeed JSON checked up front, the LR schedule on resume (Megatron's
rules), non-finite losses skipped and counted, --exit-duration-in-mins, damaged-checkpoint
recovery. Fast unit checks first, then one 2-rank job (T = P = 2) running the real ``run()``
several times in the same processes (as tests/test_training.py does)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.distributed import run_distributed
from tests.test_training import MAE, _ds, _refused

# ----------------------------------------------------------------------------------------------
# DeepSpeed JSON


@pytest.mark.parametrize("cfg, expected", [
    ({"zero_optimisation": {"stage": 1}}, "unknown top-level key 'zero_optimisation'; did you mean 'zero_optimization'?"),
    ({"zero_optimization": {"stgae": 1}}, "unknown key zero_optimization.stgae; did you mean 'stage'?"),
    ({"zero_optimization": {"offload_optimizer": {"devcie": "cpu"}}},
     "unknown key zero_optimization.offload_optimizer.devcie; did you mean 'device'?"),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}, "zero_optimization.offload_optimizer.device = 'gpu'"),
    ({"bf16": {"enabeld": True}}, "unknown key bf16.enabeld; did you mean 'enabled'?"),
    ({"tensorboard": {"output_pth": "tb"}}, "unknown key tensorboard.output_pth; did you mean 'output_path'?"),
])
def test_deepspeed_json_errors_are_one_line(cfg, expected):
    from dchag.training.ds_config import ConfigError
    from dchag.training.ds_validate import validate
    with pytest.raises(ConfigError) as e:
        validate(cfg, "my.json")
    msg = str(e.value)
    assert expected in msg and "my.json" in msg and "\n" not in msg, msg


def test_shipped_deepspeed_configs_are_valid():
    import glob
    import json
    from dchag.training.ds_validate import validate
    paths = glob.glob(os.path.join(os.path.dirname(os.path.dirname(__file__)), "ds_configs", "*.json"))
    assert len(paths) == 8
    for p in paths:
        with open(p) as f:
            validate(json.load(f), p)
    validate({"checkpoint": {"load_universal": True}, "zero_optimization": {"stage": 3, "offload_optimizer":
             {"device": "cpu"}}, "bf16": {"enabled": True}, "wall_clock_breakdown": False}, "x.json")


def test_top_level_keys_exist_in_deepspeed():
    """Every key the validator accepts is a string DeepSpeed's own source uses."""
    import deepspeed
    from dchag.training.ds_validate import TOP_LEVEL_KEYS
    root = os.path.dirname(deepspeed.__file__)
    text = ""
    for sub in ("runtime", "monitor", "profiling", "autotuning", "comm", "compile", "compression", "elasticity",
                "nebula", "inference", "datastates"):
        for dirpath, _, files in os.walk(os.path.join(root, sub)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), errors="replace") as fh:
                        text += fh.read()
    missing = [k for k in TOP_LEVEL_KEYS if f'"{k}"' not in text and f"'{k}'" not in text]
    assert not missing, missing


# ----------------------------------------------------------------------------------------------
# LR schedule rules (no processes)


class _Opt:
    def __init__(self):
        self.param_groups = [{"lr": 0.0}]


def test_schedule_change_on_resume_is_refused_unless_a_flag_says_which():
    from dchag.training.lr import LRScheduler, ScheduleError
    saved = LRScheduler(_Opt(), 1e-3, 1e-4, 2, 40, "cosine")
    for _ in range(40):
        saved.step()
    sd = saved.state_dict()
    longer = LRScheduler(_Opt(), 1e-3, 1e-4, 2, 50, "cosine")  # --train-iters 50 without --lr-decay-iters
    with pytest.raises(ScheduleError) as e:
        longer.load_state_dict(sd)
    assert "--lr-decay-iters 40 in the checkpoint, 50 on the command line" in str(e.value)
    assert "--use-checkpoint-opt-param-scheduler" in str(e.value) and "--override-opt-param-scheduler" in str(e.value)
    keep = LRScheduler(_Opt(), 1e-3, 1e-4, 2, 50, "cosine")
    assert keep.load_state_dict(sd, use_checkpoint=True) == ["--lr-decay-iters 40 -> 50"]
    assert keep.decay_iters == 40 and keep.get_lr() == pytest.approx(1e-4)  # stays at the end of the decay
    take = LRScheduler(_Opt(), 1e-3, 1e-4, 2, 50, "cosine")
    take.load_state_dict(sd, override=True)
    frac = (40 - 2) / (50 - 2)  # a plain computation of the re-stretched cosine
    assert take.get_lr() == pytest.approx(1e-4 + 0.5 * (1 + math.cos(math.pi * frac)) * 9e-4)
    with pytest.raises(ScheduleError, match="exclude each other"):
        LRScheduler(_Opt(), 1e-3, 1e-4, 2, 40, "cosine").load_state_dict(sd, use_checkpoint=True, override=True)
    same = LRScheduler(_Opt(), 1e-3, 1e-4, 2, 40, "cosine")
    assert same.load_state_dict(sd) == [] and same.num_steps == 40


def test_megatron_spellings_of_the_schedule_flags():
    from dchag.arguments import parse_args
    req = ["--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "4"]
    a = parse_args(req + ["--use-checkpoint-opt_param-scheduler"])
    b = parse_args(req + ["--override-opt_param-scheduler"])
    assert a.use_checkpoint_opt_param_scheduler and not a.override_opt_param_scheduler
    assert b.override_opt_param_scheduler and not b.use_checkpoint_opt_param_scheduler
    assert parse_args(req).lr_decay_iters is None and parse_args(req).max_consecutive_nan_iters == 10


# ----------------------------------------------------------------------------------------------
# worker side

NAN_AT: set = set()  # 1-based iterations whose loss is made NaN (set inside the workers)
WEIGHTS: dict = {}  # this rank's parameters at the start of each iteration (1-based)
SNAPSHOT: list = []  # non-empty: record WEIGHTS


def _nan_forward(model, batch, args, cfg, iteration):
    import pretrain_dchag
    if (NAN_AT or SNAPSHOT) and model.training:
        WEIGHTS[iteration + 1] = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    loss = pretrain_dchag.forward_step(model, batch, args, cfg, iteration)
    return loss * float("nan") if iteration + 1 in NAN_AT else loss


def _history(argv, nan_at=(), params=False, snapshot=False):
    import pretrain_dchag
    from dchag.arguments import parse_args
    from dchag.parallel.state_dict import full_state_dict
    from dchag.training import release, run
    NAN_AT.clear()
    NAN_AT.update(nan_at)
    WEIGHTS.clear()
    SNAPSHOT[:] = [1] if snapshot else []
    h = run(parse_args(argv), pretrain_dchag.model_provider, _nan_forward, pretrain_dchag.datasets_provider)
    out = {k: h.get(k) for k in ("losses", "lrs", "skipped", "grad_norms", "exit_reason", "summary")}
    out["weights"] = dict(WEIGHTS)
    inner = getattr(h["engine"].optimizer, "optimizer", h["engine"].optimizer)  # the client AdamW
    out["adam_steps"] = sorted({int(st["step"]) for st in inner.state.values() if "step" in st})
    if params:
        out["params"] = full_state_dict(h["engine"].module)
    release(h)
    return out


def _error_of(argv, nan_at=()):
    try:
        _history(argv, nan_at)
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        return type(e).__name__, str(e)
    return "no error", ""


def write_cube(path):
    import json
    import numpy as np
    x = np.random.default_rng(0).normal(size=(3, 13, 19, 16)).astype(np.float32)
    x[0, :, 0:8, 0:8] = np.nan
    np.save(path, x)
    with open(path[:-4] + ".channels.json", "w") as f:
        json.dump({"channel_names": [f"band{400 + 10 * c}" for c in range(13)],
                   "wavelengths": [400.0 + 10 * c for c in range(13)]}, f)


def _ops_job(tmp):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    p = lambda name: os.path.join(tmp, name)  # noqa: E731
    base = _ds("zero1_fp32.json") + MAE + ["--channel-parallel-size", "2"]
    r = {}
    # LR schedule: 4 iterations whose decay ends at 4, then resumed to 6.
    r["short"] = _history(base + ["--train-iters", "4", "--save", p("a")])
    r["err_schedule"] = _refused(base + ["--train-iters", "6", "--load", p("a"), "--save", p("b")], p("a"))
    r["override"] = _history(base + ["--train-iters", "6", "--load", p("a"), "--override-opt_param-scheduler"])
    r["decay_iters"] = _history(base + ["--train-iters", "6", "--lr-decay-iters", "4", "--load", p("a")])
    # --exit-duration-in-mins: a deadline already past stops after the first iteration, saved.
    r["duration"] = _history(base + ["--train-iters", "50", "--exit-duration-in-mins", "1e-9", "--save", p("d")])
    # Non-finite losses at iterations 2 and 3: skipped; the weights entering iteration 4 are those
    # entering iteration 2 (ZeRO 1, and ZeRO 0 whose client optimizer the loop guards itself).
    for stage in (1, 0):
        ds = _ds(f"zero{stage}_fp32.json") + MAE + ["--channel-parallel-size", "2"]
        r[f"nan{stage}"] = _history(ds + ["--train-iters", "5", "--log-interval", "1",
                                          "--tensorboard-dir", p(f"tb{stage}")], {2, 3}, params=True)
    # Consecutive non-finite iterations beyond the limit: stop; nothing saved during the streak.
    r["streak"] = _error_of(base + ["--train-iters", "20", "--max-consecutive-nan-iters", "3", "--save", p("c"),
                                    "--save-interval", "2"], set(range(3, 21)))
    # Damaged checkpoint: iteration 6's rank-1 model states cut short.
    r["full"] = _history(base + ["--train-iters", "6", "--save", p("e"), "--save-interval", "3"])
    if dist.get_rank() == 0:
        path = p("e/iter_0000006/mp_rank_01_model_states.pt")
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    dist.barrier()
    resume = base + ["--train-iters", "6", "--load", p("e"), "--save", p("e")]
    r["err_damaged"] = _refused(resume, p("e"))
    r["recovered"] = _history(resume + ["--ckpt-step", "3"])
    # .npy data: 3 images of 13 channels, 19 x 16 (6 tiles of 8 x 8 each, the last row of tiles padded);
    # tile 0 of image 0 has no valid value; names and wavelengths from the sidecar.
    npy = p("cube.npy")
    if dist.get_rank() == 0:
        write_cube(npy)
    dist.barrier()
    data = list(MAE)
    data[data.index("--data-path") + 1] = npy
    npy_base = _ds("zero1_fp32.json") + data + ["--channel-parallel-size", "2", "--valid-fraction", "0"]
    r["err_strict"] = _refused(npy_base + ["--train-iters", "2", "--data-strict", "--save", p("strict")])
    r["empty"] = _history(npy_base + ["--train-iters", "18", "--micro-batch-size", "1", "--log-interval", "18"],
                          snapshot=True)
    # The same model in one layout without sharding (T = P = 1), for the summary's parameter count.
    from dchag.arguments import model_config, parse_args
    from dchag.model.vit import DChagViT
    from tests.model_cases import setup_layout
    setup_layout(1, 1)
    args = parse_args(npy_base + ["--train-iters", "1"])
    args.num_channels = 13
    r["serial_params"] = sum(q.numel() for q in DChagViT(model_config(args)).parameters())
    ps.destroy_model_parallel()
    r["rank"] = dist.get_rank()
    return r


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("ops"))
    return tmp, run_distributed(_ops_job, 2, tmp)


def _cosine(s, warmup=2, decay=4, lr=1e-3, min_lr=1e-4):
    if s < warmup:
        return lr * (s + 1) / warmup
    frac = min((s - warmup) / (decay - warmup), 1.0)
    return min_lr + 0.5 * (1 + math.cos(math.pi * frac)) * (lr - min_lr)


def test_resume_with_a_longer_schedule(ops):
    _, ranks = ops
    for r in ranks:
        kind, msg, unchanged = r["err_schedule"]
        assert kind == "ScheduleError" and unchanged, msg
        assert "--lr-decay-iters 4 in the checkpoint, 6 on the command line (its default: --train-iters)" in msg, msg
        assert [r["short"]["lrs"][i] for i in (1, 2, 3, 4)] == pytest.approx([_cosine(s) for s in range(4)])
        # --lr-decay-iters 4 (what --use-checkpoint-opt-param-scheduler keeps): the decay ended at 4.
        assert r["decay_iters"]["lrs"] == {5: pytest.approx(1e-4), 6: pytest.approx(1e-4)}
        # take the command line's: the cosine over 6 iterations, from step 4 on.
        assert r["override"]["lrs"] == {5: pytest.approx(_cosine(4, decay=6)), 6: pytest.approx(_cosine(5, decay=6))}


def test_exit_duration_saves_and_stops(ops):
    tmp, ranks = ops
    for r in ranks:
        assert sorted(r["duration"]["losses"]) == [1]
        assert r["duration"]["exit_reason"] == "--exit-duration-in-mins 1e-09 reached"
    with open(os.path.join(tmp, "d", "latest")) as f:
        assert f.read() == "iter_0000001"


@pytest.mark.parametrize("stage", [1, 0])
def test_non_finite_loss_skips_the_update(ops, stage):
    tmp, ranks = ops
    for r in ranks:
        h = r[f"nan{stage}"]
        assert h["skipped"] == [2, 3]
        assert all(math.isfinite(h["losses"][i]) for i in (1, 4)) and not math.isfinite(h["losses"][2])
        assert h["lrs"][4] == h["lrs"][2] == pytest.approx(_cosine(1, decay=4)), "the schedule waits"
        # no update at 2 and 3: the weights entering 4 are exactly those entering 2; 4 updates them
        w = h["weights"]
        assert sorted(w) == [1, 2, 3, 4, 5]
        assert all(torch.equal(w[2][k], w[4][k]) for k in w[2])
        assert not all(torch.equal(w[4][k], w[5][k]) for k in w[4]) and not all(
            torch.equal(w[1][k], w[2][k]) for k in w[1])
        assert all(torch.isfinite(v).all() for v in h["params"].values())
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tmp, f"tb{stage}"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("skipped-iterations")] == [0, 1, 1, 0, 0]
    assert [e.value for e in acc.Scalars("nan-iterations")] == [0, 1, 1, 0, 0]


def test_too_many_non_finite_iterations_stop_the_run(ops):
    """Non-finite from iteration 3 on, saves due every 2: iteration 4 falls in the streak and is not
    saved; the stop message names iteration 2's checkpoint, from before the streak."""
    tmp, ranks = ops
    for r in ranks:
        kind, msg = r["streak"]
        assert kind == "NonFiniteError", msg
        assert msg.startswith("3 consecutive iterations (up to 5) had a non-finite loss")
        assert f"the last checkpoint before it is {tmp}/c/iter_0000002" in msg and "began at iteration 3" in msg, msg
        assert "--max-consecutive-nan-iters" in msg
    saved = [n for n in os.listdir(os.path.join(tmp, "c")) if n.startswith("iter_")]
    assert sorted(saved) == ["iter_0000002"], saved


def test_damaged_checkpoint_names_a_command_that_resumes(ops):
    tmp, ranks = ops
    e = os.path.join(tmp, "e")
    kind, msg, unchanged = ranks[0]["err_damaged"]
    # The checksum manifest sees the truncation first (IntegrityError, a CheckpointError).
    assert kind in ("CheckpointError", "IntegrityError") and unchanged, msg
    assert f"{e}/iter_0000006" in msg and "mp_rank_01_model_states.pt" in msg, msg
    assert f"--ckpt-step 3 added (--load {e} --ckpt-step 3" in msg, msg
    assert ranks[1]["err_damaged"][0] in ("CheckpointError", "IntegrityError")
    for r in ranks:  # the command it names resumes and continues the uninterrupted run exactly
        rec, full = r["recovered"]["losses"], r["full"]["losses"]
        assert sorted(rec) == [4, 5, 6] and all(rec[i] == full[i] for i in rec), (rec, full)
    assert os.path.isdir(os.path.join(e, "iter_0000006.damaged"))
    assert os.path.getsize(os.path.join(e, "iter_0000006.damaged", "mp_rank_01_model_states.pt")) > 0
    with open(os.path.join(e, "latest")) as f:
        assert f.read() == "iter_0000006"


def test_data_strict_refuses_before_training(ops):
    tmp, ranks = ops
    for r in ranks:  # every rank raises the same message (rank 1 holds the other channels)
        kind, msg, _ = r["err_strict"]
        assert kind == "DataError", msg
        assert "image 0, rows 0:8, cols 0:8" in msg and "cube.npy" in msg, msg
    assert not os.path.exists(os.path.join(tmp, "strict")), "refused before anything was trained or saved"


def test_empty_sample_is_skipped_and_counted(ops):
    _, ranks = ops
    for r in ranks:
        h = r["empty"]
        assert len(h["skipped"]) == 1, h["skipped"]  # one epoch of 18 tiles, one of them empty
        it = h["skipped"][0]
        assert math.isnan(h["losses"][it]) and h["grad_norms"][it] is None
        assert all(math.isfinite(v) for i, v in h["losses"].items() if i != it)
        assert h["adam_steps"] == [17], "17 updates in 18 iterations: none from the empty sample"
        assert it not in h["weights"], "no forward pass for it"
        if it < 18:
            assert h["lrs"][it + 1] == h["lrs"][it], "the LR schedule waits"


def test_startup_summary(ops):
    tmp, ranks = ops
    lines = ranks[0]["empty"]["summary"]
    text = "\n".join(lines)
    assert "3 image(s) of 13 channels, 19 x 16; channels band400, band410 ... band520 (400-520 nm)" in text, text
    assert "train 18 / valid 0 samples" in text, text
    assert ("edges: 3 image(s) of 19 x 16: the last row of tiles padded with 5 row(s), the last column with 0 "
            "column(s)") in text, text
    assert "statistics: computed at start-up" in text, text
    assert "channel rank 0: channels 0-6 (groups 0-1); channel rank 1: channels 7-12 (groups 2-3)" in text, text
    assert "ZeRO stage 1; precision fp32" in text and "T 2 x DP 1, channel-parallel P 2" in text, text
    # parameters in total: the same model built in one process (P = T = 1) counts them plainly
    total = int(text.split(" in total")[0].rsplit(", ", 1)[-1].replace(",", ""))
    assert total == ranks[0]["serial_params"], (total, ranks[0]["serial_params"])


def test_npy_sidecar_channels_last_and_edges(tmp_path):
    import json
    import numpy as np
    from dchag.data import open_source
    from dchag.data.errors import DataError
    from dchag.data.tiles import TileIndex
    path = str(tmp_path / "cube.npy")
    write_cube(path)
    src = open_source(path)
    assert src.channel_names[:2] == ["band400", "band410"] and src.wavelengths[-1] == 520.0
    with open(str(tmp_path / "cube.channels.json"), "w") as f:
        json.dump({"channel_names": ["a", "b"]}, f)
    with pytest.raises(DataError, match="cube.channels.json.*lists 2 channel names but the data has 13"):
        open_source(path)
    last = str(tmp_path / "hwc.npy")
    np.save(last, np.zeros((16, 16, 13), np.float32))
    with pytest.raises(DataError, match=r"np.moveaxis\(a, -1, -3\)"):
        open_source(last, num_channels=13)
    with pytest.raises(DataError, match=r"16 channels of 16 x 13 .* 13 channels of 16 x 16 .*--num-channels 16"):
        open_source(last).check_channel_axis(None)
    assert TileIndex([(16, 16)], 8, 8).edge_report() is None
    assert TileIndex([(19, 21), (19, 21)], 8, 8).edge_report().startswith(
        "2 image(s) of 19 x 21: the last row of tiles padded with 5 row(s), the last column with 3 column(s)")


def test_every_flag_has_help_and_default():
    from dchag.arguments import build_parser
    parser = build_parser()
    missing = [a.option_strings[0] for a in parser._actions if a.option_strings and not a.help]
    assert not missing, missing
    text = " ".join(parser.format_help().split())
    assert "masked in every tile (default: 0.75)" in text
    assert "--max-consecutive-nan-iters MAX_CONSECUTIVE_NAN_ITERS stop" in text and "(default: 10)" in text
    assert "(default: None)" not in text
