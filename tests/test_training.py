"""End-to-end training through the real ``pretrain()`` path (pretrain_dchag.py's providers),
tiny models on synthetic and bundled data, ranks spawned on gloo.

Jobs (startup dominates on CPU, so a job runs several trainings in one set of processes;
``dchag.training.release`` frees each run's engine and groups before the next):

* 2 ranks, T = P = 2, ZeRO 1: an uninterrupted run saving at iterations 3 and 6; a run resumed
  from iteration 3 (every later loss compared bit for bit); the same model on P = 1 (loss equal
  to float32 rounding), whose checkpoint goes through ``ds_to_universal`` and continues on P = 2;
  bf16 (with an exact resume); a forecast on the bundled ERA5 sample with activation recompute;
  and the refusals (DeepSpeed JSON conflicts, checkpoint argument mismatch, a fresh run into a
  used --save folder, a missing --load), with file snapshots showing nothing saved changed.
* 4 ranks, T = P = 2 x DP 2: save/resume for ZeRO 0, 1, 2 and 3 (fp32), the stages against each
  other, bf16 under every stage, ``ds_to_universal`` of a ZeRO 3 checkpoint.
* A rank killed while saving: ``latest`` stays on the last complete checkpoint and a relaunch
  continues the loss curve exactly.
* The launchers: a conflicting launch through ``torch.distributed.run`` exits non-zero with the
  message; ``deepspeed --num_gpus 2 pretrain_dchag.py ...`` trains and saves on CPU.

Dropout is on (0.1) in the resume runs, so an exact resume needs every RNG state restored.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed import free_port, run_distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ERA5 = os.path.join(REPO, "data", "samples", "era5_5.625deg.nc")
ITERS, SAVE_AT = 6, 3

# A tiny D-CHAG-L MAE on 13 synthetic channels, G = 4 (uneven groups 4, 3, 3, 3).
MAE = ["--task", "mae", "--data-path", "synthetic:num_images=48", "--num-channels", "13",
       "--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--mask-ratio", "0.5",
       "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
       "--dchag-aggregation", "linear", "--dchag-groups", "4", "--tensor-model-parallel-size", "2",
       "--micro-batch-size", "2", "--lr", "1e-3", "--min-lr", "1e-4", "--lr-warmup-iters", "2",
       "--lr-decay-style", "cosine", "--clip-grad", "1.0", "--seed", "1234", "--log-interval", "1000"]
DROPOUT = ["--hidden-dropout", "0.1", "--attention-dropout", "0.1"]


def _ds(name):
    return ["--deepspeed", "--deepspeed_config", os.path.join(REPO, "ds_configs", name)]


def _snapshot(folder):
    """path -> (size, mtime_ns, sha1) of every file under ``folder``."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = (os.path.getsize(p), os.stat(p).st_mtime_ns,
                                                   hashlib.sha1(fh.read()).hexdigest())
    return out


# ----------------------------------------------------------------------------------------------
# worker side (runs in each spawned gloo rank)
# ----------------------------------------------------------------------------------------------


def _train(argv, full_params=False):
    """One run of the real entry point; returns the exact per-iteration losses."""
    import pretrain_dchag
    from dchag.parallel.state_dict import full_state_dict
    from dchag.training import pretrain, release
    history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step, pretrain_dchag.datasets_provider,
                       argv, eval_metrics_func=pretrain_dchag.task_metrics)
    out = {k: history[k] for k in ("losses", "val_losses", "val_metrics", "grad_norms", "summary")}
    if full_params:
        out["params"] = full_state_dict(history["engine"].module)
    release(history)
    return out


def _refused(argv, folder=None):
    """Run ``argv`` expecting a refusal: (exception type, message, files of ``folder`` unchanged)."""
    import torch.distributed as dist
    import pretrain_dchag
    from dchag.arguments import parse_args
    from dchag.training import run
    before = _snapshot(folder) if folder else None
    try:
        run(parse_args(argv), pretrain_dchag.model_provider, pretrain_dchag.forward_step,
            pretrain_dchag.datasets_provider)
    except Exception as e:  # noqa: BLE001 - the test inspects type and message
        result = (type(e).__name__, str(e))
    else:
        result = ("no error", "")
    dist.barrier()
    return result + ((_snapshot(folder) == before) if folder else None,)


def _threads():
    return len(os.listdir("/proc/self/task"))


def _ds_to_universal(src, dst):
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", src,
           "--output_folder", dst, "--num_extract_workers", "1", "--num_merge_workers", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _two_rank_job(tmp):
    import torch.distributed as dist
    a, b = os.path.join(tmp, "a"), os.path.join(tmp, "b")
    zero1 = _ds("zero1_fp32.json")
    base = zero1 + MAE + DROPOUT + ["--channel-parallel-size", "2", "--train-iters", str(ITERS)]
    r = {"threads_start": _threads()}
    r["full"] = _train(base + ["--save", a, "--save-interval", str(SAVE_AT), "--eval-interval", "3",
                               "--tensorboard-dir", os.path.join(tmp, "tb"), "--log-interval", "2"], full_params=True)
    r["threads_after_one"] = _threads()
    r["resumed"] = _train(base + ["--load", a, "--ckpt-step", str(SAVE_AT), "--save", b, "--eval-interval", "3"])
    # The same model (G = 4, T = 2, same seed) with the channel stage replicated: P = 1.
    p1 = os.path.join(tmp, "p1")
    r["p1"] = _train(zero1 + MAE + DROPOUT + ["--channel-parallel-size", "1", "--train-iters", str(ITERS),
                                              "--save", p1, "--save-interval", str(SAVE_AT)])
    # Its iteration-3 checkpoint, converted by ds_to_universal, continued on P = 2: every rank
    # cuts its own channel rows (7 and 6) from the merged parameters.
    universal_json = os.path.join(tmp, "universal.json")
    if dist.get_rank() == 0:
        with open(universal_json, "w") as f:
            json.dump({"zero_optimization": {"stage": 1}, "checkpoint": {"load_universal": True}}, f)
        _ds_to_universal(os.path.join(p1, "iter_0000003"), os.path.join(tmp, "u", "iter_0000003"))
    dist.barrier()
    r["universal_p2"] = _train(["--deepspeed", "--deepspeed_config", universal_json] + MAE + DROPOUT + [
        "--channel-parallel-size", "2", "--train-iters", str(ITERS), "--load", os.path.join(tmp, "u")])

    # Refusals: nothing is built, trained or written.
    jsons = {}
    for name, content in (("batch", {"train_batch_size": 8}), ("micro", {"train_micro_batch_size_per_gpu": 4})):
        jsons[name] = os.path.join(tmp, f"{name}.json")
        with open(jsons[name], "w") as f:
            json.dump({**content, "zero_optimization": {"stage": 1}}, f)
    short = MAE + ["--channel-parallel-size", "2", "--train-iters", "2"]  # MAE gives --micro-batch-size 2
    r["err_batch"] = _refused(["--deepspeed", "--deepspeed_config", jsons["batch"], "--global-batch-size", "4"] + short)
    r["err_micro"] = _refused(["--deepspeed", "--deepspeed_config", jsons["micro"]] + short)
    r["err_bf16"] = _refused(zero1 + short + ["--bf16"])
    resume = zero1 + MAE + ["--train-iters", str(ITERS), "--load", a, "--save", a]
    r["err_groups"] = _refused(resume + ["--channel-parallel-size", "2", "--dchag-groups", "2"], a)
    r["err_layout"] = _refused(resume + ["--channel-parallel-size", "1"], a)
    r["err_lr_mult"] = _refused(resume + ["--channel-parallel-size", "2", "--dchag-partial-lr-mult", "0.5"], a)
    r["err_overwrite"] = _refused(zero1 + short + ["--save", a], a)  # fresh run into a used folder
    r["err_missing"] = _refused(zero1 + short + ["--load", os.path.join(tmp, "nothing-here")])

    # bf16 (DeepSpeed's bf16 optimizer, ZeRO 1) and a forecast on the bundled ERA5 sample.
    bf16 = _ds("zero1_bf16.json") + MAE + DROPOUT + ["--channel-parallel-size", "2", "--train-iters", "3"]
    r["bf16"] = _train(bf16 + ["--save", os.path.join(tmp, "bf16"), "--save-interval", "1"])
    r["bf16_resumed"] = _train(bf16 + ["--load", os.path.join(tmp, "bf16"), "--ckpt-step", "1"])
    r["forecast"] = _train(zero1 + [
        "--task", "forecast", "--data-path", ERA5, "--img-h", "32", "--img-w", "64", "--patch-dim", "8",
        "--lead-time", "1", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
        "--dchag-aggregation", "cross", "--dchag-groups", "2", "--tensor-model-parallel-size", "2",
        "--channel-parallel-size", "2", "--recompute-activations", "--micro-batch-size", "2",
        "--train-iters", "3", "--lr", "1e-3", "--eval-interval", "3", "--log-interval", "1000"])
    r["threads_end"] = _threads()
    return r


def _crash_while_saving(folder):
    """Rank 1 dies right after writing its part of the iteration-6 checkpoint."""
    import torch.distributed as dist
    from deepspeed.runtime.engine import DeepSpeedEngine
    original = DeepSpeedEngine.save_checkpoint

    def save_checkpoint(self, save_dir, tag=None, **kwargs):
        out = original(self, save_dir, tag=tag, **kwargs)
        if tag == "iter_0000006" and dist.get_rank() == 1:
            os._exit(17)  # the process dies on the spot (rank 0 is left waiting in the commit barrier)
        return out

    DeepSpeedEngine.save_checkpoint = save_checkpoint
    _train(_ds("zero1_fp32.json") + MAE + DROPOUT + ["--channel-parallel-size", "2", "--train-iters", str(ITERS),
                                                     "--save", folder, "--save-interval", str(SAVE_AT)])


def _restart_after_crash(folder):
    return _train(_ds("zero1_fp32.json") + MAE + DROPOUT + ["--channel-parallel-size", "2", "--train-iters",
                                                            str(ITERS), "--load", folder, "--save", folder])


def _four_rank_job(tmp, stages):
    r = {}
    for stage in stages:
        a, b = os.path.join(tmp, f"z{stage}a"), os.path.join(tmp, f"z{stage}b")
        base = _ds(f"zero{stage}_fp32.json") + MAE + DROPOUT + [
            "--channel-parallel-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS)]
        full = _train(base + ["--save", a, "--save-interval", str(SAVE_AT)], full_params=stage == 3)
        resumed = _train(base + ["--load", a, "--ckpt-step", str(SAVE_AT), "--save", b])
        r[stage] = {"full": full["losses"], "resumed": resumed["losses"], "grad_norms": full["grad_norms"],
                    "params": full.get("params"), "folder": a}
    for stage in stages:  # bf16: DeepSpeed's bf16 optimizers (fp32 master weights), same model
        r[f"bf16_{stage}"] = _train(_ds(f"zero{stage}_bf16.json") + MAE + [
            "--channel-parallel-size", "2", "--global-batch-size", "8", "--train-iters", "3"])["losses"]
    if 3 in stages:  # --dchag-partial-lr-mult 0 through ZeRO 3's partitioned optimizer, against --lr 0 (= the init)
        short = _ds("zero3_fp32.json") + MAE + ["--channel-parallel-size", "2", "--global-batch-size", "8",
                                                "--train-iters", "3"]
        r["lr0_3"] = _train(short + ["--lr", "0", "--min-lr", "0"], full_params=True)["params"]
        r["partial_frozen_3"] = _train(short + ["--dchag-partial-lr-mult", "0"], full_params=True)["params"]
    if 3 in stages:  # the streamed channel stage under ZeRO 3: its recompute must find the parameters gathered
        for K in (0, 2):  # unstreamed; chunks of 2 channels (several per rank, cutting the uneven groups)
            r[f"chunk{K}_3"] = _train(_ds("zero3_fp32.json") + MAE + DROPOUT + [
                "--channel-parallel-size", "2", "--global-batch-size", "8", "--train-iters", str(ITERS),
                "--dchag-channel-chunk", str(K)])["losses"]
            r[f"chunk{K}_bf16_3"] = _train(_ds("zero3_bf16.json") + MAE + [
                "--channel-parallel-size", "2", "--global-batch-size", "8", "--train-iters", "3",
                "--dchag-channel-chunk", str(K)])["losses"]
    return r


# ----------------------------------------------------------------------------------------------
# tests
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train2"))
    result = run_distributed(_two_rank_job, 2, tmp)
    return tmp, result


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("train4"))
    return run_distributed(_four_rank_job, 4, tmp, (0, 1, 2, 3))


def _check_resume(full, resumed):
    assert sorted(full) == list(range(1, ITERS + 1))
    assert sorted(resumed) == list(range(SAVE_AT + 1, ITERS + 1)), "the resumed run starts after the checkpoint"
    for it in resumed:  # exact float equality, not the rounded log value
        assert resumed[it] == full[it], f"iteration {it}: resumed {resumed[it]!r} != uninterrupted {full[it]!r}"
    assert all(math.isfinite(v) for v in full.values())


def test_resume_is_exact_zero1_two_ranks(two):
    _, ranks = two
    for r in ranks:
        _check_resume(r["full"]["losses"], r["resumed"]["losses"])
    assert ranks[0]["full"]["losses"] == ranks[1]["full"]["losses"], "every rank reports the same loss"
    assert ranks[0]["full"]["val_losses"].keys() == {3, 6}
    assert ranks[0]["resumed"]["val_losses"][6] == ranks[0]["full"]["val_losses"][6]
    # the resumed run normalizes with the statistics its checkpoint saved (not recomputed)
    assert any(line.startswith(f"statistics: saved with checkpoint ") and line.endswith(f"iter_{SAVE_AT:07d}")
               for line in ranks[0]["resumed"]["summary"]), ranks[0]["resumed"]["summary"]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_resume_is_exact_four_ranks(four, stage):
    for r in four:
        _check_resume(r[stage]["full"], r[stage]["resumed"])
    assert four[0][stage]["full"] == four[2][stage]["full"], "both data-parallel replicas report the global loss"


def test_zero_stages_train_the_same_model(four):
    """ZeRO only partitions the optimizer: loss curves and clipped grad norms agree to rounding
    across stages (ZeRO 0 included: its norm is reported too)."""
    ref, ref_gn = four[0][1]["full"], four[0][1]["grad_norms"]
    assert all(math.isfinite(g) and g > 0 for g in ref_gn.values())
    for stage in (0, 2, 3):
        for it, v in four[0][stage]["full"].items():
            assert abs(v - ref[it]) <= 1e-5 * abs(ref[it]), (stage, it, v, ref[it])
            gn = four[0][stage]["grad_norms"][it]
            assert abs(gn - ref_gn[it]) <= 1e-4 * ref_gn[it], (stage, it, gn, ref_gn[it])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_trains_under_every_zero_stage(four, stage):
    """bf16 (fp32 master weights) follows the fp32 curve to bf16 rounding, and every ZeRO stage
    trains the same bf16 model. (ZeRO 0 bf16 is DeepSpeed's FP16_UnfusedOptimizer, whose setup
    step would otherwise make its early AdamW updates ~0.74x too small.)"""
    bf16, fp32, ref = four[0][f"bf16_{stage}"], four[0][stage]["full"], four[0]["bf16_1"]
    assert sorted(bf16) == [1, 2, 3]
    for it, v in bf16.items():
        assert math.isfinite(v) and abs(v - fp32[it]) <= 1e-2 * fp32[it], (it, v, fp32[it])
        assert abs(v - ref[it]) <= 1e-3 * ref[it], (stage, it, v, ref[it])


def test_streamed_channel_stage_trains_the_same_model_under_zero3(four):
    """--dchag-channel-chunk 2 (chunks cut the uneven groups) under ZeRO 3: the same loss curve
    as the unstreamed run, fp32 to rounding, bf16 to bf16 rounding."""
    ref, streamed = four[0]["chunk0_3"], four[0]["chunk2_3"]
    assert sorted(streamed) == sorted(ref) == list(range(1, ITERS + 1))
    for it, v in streamed.items():
        assert abs(v - ref[it]) <= 1e-5 * abs(ref[it]), (it, v, ref[it])
    ref_bf16, streamed_bf16 = four[0]["chunk0_bf16_3"], four[0]["chunk2_bf16_3"]
    assert sorted(streamed_bf16) == sorted(ref_bf16)
    for it, v in streamed_bf16.items():
        assert math.isfinite(v) and abs(v - ref_bf16[it]) <= 1e-2 * ref_bf16[it], (it, v, ref_bf16[it])


def test_partial_lr_mult_zero_freezes_only_the_partial_stage_under_zero3(four):
    """--dchag-partial-lr-mult 0 under ZeRO 3 (P = 2, T = 2): after 3 steps the partial stage is
    exactly its initial value (a --lr 0 run) and every other weight matrix has moved."""
    init, frozen = four[0]["lr0_3"], four[0]["partial_frozen_3"]
    assert init.keys() == frozen.keys()
    partial = [n for n in init if n.startswith("partial.")]
    assert partial, sorted(init)
    for n in partial:
        assert torch.equal(frozen[n], init[n]), n
    moved = [n for n in init if not n.startswith("partial.") and init[n].dim() == 2 and torch.equal(frozen[n], init[n])]
    assert moved == [], f"weight matrices that did not train: {moved}"


def test_channel_parallel_size_does_not_change_the_loss(two):
    _, ranks = two
    p2, p1 = ranks[0]["full"]["losses"], ranks[0]["p1"]["losses"]
    assert sorted(p1) == sorted(p2)
    worst = max(abs(p1[i] - p2[i]) / abs(p2[i]) for i in p2)
    assert worst <= 1e-5, f"P=1 vs P=2: largest relative loss difference {worst:.3e}"


def test_universal_checkpoint_moves_to_another_layout(two):
    """T = 2, P = 1, iteration 3 -> ds_to_universal -> loaded with P = 2 (same T, so the same RNG
    streams): the loss curve continues as the uninterrupted run, to float32 rounding."""
    _, ranks = two
    for r in ranks:
        for ref in (r["p1"]["losses"], r["full"]["losses"]):
            moved = r["universal_p2"]["losses"]
            assert sorted(moved) == list(range(SAVE_AT + 1, ITERS + 1))
            for it in moved:
                assert abs(moved[it] - ref[it]) <= 1e-5 * abs(ref[it]), (it, moved[it], ref[it])


def test_config_conflicts_are_refused_before_training(two):
    _, ranks = two
    for r in ranks:
        kind, msg, _ = r["err_batch"]
        assert kind == "ConfigError", msg
        assert "train_batch_size=8" in msg and "--global-batch-size 4" in msg
        kind, msg, _ = r["err_bf16"]
        assert kind == "ConfigError" and "bf16.enabled=False" in msg and "--bf16" in msg, msg
        kind, msg, _ = r["err_micro"]
        assert kind == "ConfigError" and "train_micro_batch_size_per_gpu=4" in msg and "--micro-batch-size 2" in msg, msg


def test_checkpoint_mismatch_is_refused_and_nothing_is_overwritten(two):
    tmp, ranks = two
    for r in ranks:
        kind, msg, unchanged = r["err_groups"]
        assert kind == "CheckpointError" and "--dchag-groups 4" in msg and "--dchag-groups 2" in msg, msg
        assert unchanged
        kind, msg, unchanged = r["err_layout"]
        assert kind == "CheckpointError" and "--channel-parallel-size 2" in msg, msg
        assert unchanged
        kind, msg, unchanged = r["err_lr_mult"]  # not DeepSpeed's parameter-alignment error
        assert kind == "CheckpointError" and "--dchag-partial-lr-mult 1.0" in msg and "--no-load-optim" in msg, msg
        assert unchanged
        kind, msg, unchanged = r["err_overwrite"]
        assert kind == "CheckpointError" and "iter_0000006" in msg and "overwrite" in msg, msg
        assert unchanged
        kind, msg, _ = r["err_missing"]
        assert kind == "CheckpointError" and "nothing-here" in msg, msg
    with open(os.path.join(tmp, "a", "latest")) as f:
        assert f.read() == "iter_0000006"


def test_crash_while_saving_keeps_latest_and_restarts(two, tmp_path):
    """A rank dying mid-save leaves `latest` on the previous complete checkpoint; relaunching with
    --load DIR --save DIR resumes from it, rewrites the incomplete folder, and continues the
    uninterrupted loss curve exactly."""
    _, ranks = two
    folder = str(tmp_path / "run")
    with pytest.raises(Exception, match="exit code 17"):
        run_distributed(_crash_while_saving, 2, folder)
    assert (tmp_path / "run" / "latest").read_text() == "iter_0000003"
    assert (tmp_path / "run" / "iter_0000006").is_dir()
    # Rank 0 may have written dchag_args.json before the barrier found rank 1 gone; without the manifest
    # (written last, by every rank) the folder is an interrupted save (dchag/checkpointing/engine.py).
    assert not (tmp_path / "run" / "iter_0000006" / "manifest.json").exists()
    restarted = run_distributed(_restart_after_crash, 2, folder)[0]["losses"]
    _check_resume(ranks[0]["full"]["losses"], restarted)
    assert (tmp_path / "run" / "latest").read_text() == "iter_0000006"
    assert (tmp_path / "run" / "iter_0000006" / "dchag_args.json").exists()


def test_checkpoint_contents(two):
    tmp, _ = two
    from deepspeed.checkpoint.constants import AFFINE_MAP, UNIVERSAL_CHECKPOINT_INFO
    folder = os.path.join(tmp, "a", "iter_0000003")
    sd = torch.load(os.path.join(folder, "mp_rank_01_model_states.pt"), map_location="cpu", weights_only=False)
    assert sd["iteration"] == 3 and sd["consumed_samples"] == 3 * 2
    assert sd["lr_scheduler"]["num_steps"] == 3
    assert sd["args"]["channel_parallel_size"] == 2
    assert len(sd["rng_states"]) == 1 and {"random", "numpy", "torch", "tracker"} <= set(sd["rng_states"][0])
    maps = sd[UNIVERSAL_CHECKPOINT_INFO][AFFINE_MAP]["params"]
    assert any("tokenizer" in k for k in maps)
    with open(os.path.join(folder, "dchag_args.json")) as f:
        assert json.load(f)["dchag_groups"] == 4


def _check_universal(folder, params, out):
    _ds_to_universal(folder, out)
    for name, full in params.items():
        merged = torch.load(os.path.join(out, "zero", name, "fp32.pt"), weights_only=False)["param"]
        assert merged.shape == full.shape, name
        assert torch.equal(merged, full.float()), name


def test_ds_to_universal_merges_every_shard(two, tmp_path):
    """DeepSpeed's converter rebuilds each full fp32 parameter (TP- and channel-sharded ones
    included, groups of uneven size) exactly from the T = P = 2, ZeRO 1 checkpoint."""
    tmp, ranks = two
    _check_universal(os.path.join(tmp, "a", "iter_0000006"), ranks[0]["full"]["params"], str(tmp_path / "u"))


def test_ds_to_universal_zero3(four, tmp_path):
    """... and from the ZeRO 3 checkpoint of T = P = 2 x DP 2 (parameters partitioned over DP too)."""
    r = four[0][3]
    _check_universal(os.path.join(r["folder"], "iter_0000006"), r["params"], str(tmp_path / "u"))


def test_bf16_and_forecast_runs_train(two):
    _, ranks = two
    bf16, resumed = ranks[0]["bf16"]["losses"], ranks[0]["bf16_resumed"]["losses"]
    assert sorted(resumed) == [2, 3] and all(resumed[i] == bf16[i] for i in resumed), (bf16, resumed)
    for key in ("bf16", "forecast"):
        losses = ranks[0][key]["losses"]
        assert sorted(losses) == [1, 2, 3], key
        assert all(math.isfinite(v) and v > 0 for v in losses.values()), (key, losses)
    assert math.isfinite(ranks[0]["forecast"]["val_losses"][3])


def test_forecast_evaluation_reports_rmse_and_acc_per_variable(two):
    """One eval micro-batch, every target valid: the val loss (latitude-weighted MSE over all
    variables, normalized) is the mean over variables of (RMSE_v / std_v)^2."""
    from dchag.data import build_datasets, open_source
    _, ranks = two
    val, metrics = ranks[0]["forecast"]["val_losses"][3], ranks[0]["forecast"]["val_metrics"][3]
    names = open_source(ERA5).channel_names
    assert sorted(metrics) == sorted([f"rmse/{n}" for n in names] + [f"acc/{n}" for n in names])
    assert all(-1.0 <= metrics[f"acc/{n}"] <= 1.0 for n in names), metrics
    std = build_datasets(ERA5, task="forecast", img_h=32, img_w=64, lead_time=1)[0].target_stats.safe_std  # training
    normalized = [(metrics[f"rmse/{n}"] / s) ** 2 for n, s in zip(names, std)]
    assert sum(normalized) / len(normalized) == pytest.approx(val, rel=1e-5)


def test_repeated_runs_do_not_pile_up_threads(two):
    _, ranks = two
    r = ranks[0]
    # Every later run must release its engine and groups: the count stays at one run's worth.
    assert r["threads_end"] <= r["threads_after_one"] + 8, (r["threads_start"], r["threads_after_one"],
                                                           r["threads_end"])


def test_tensorboard_tags(two):
    tmp, _ = two
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(tmp, "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "learning-rate", "grad-norm", "iteration-time", "samples-per-second", "peak-memory-mb",
            "val/loss"} <= tags
    assert [e.step for e in acc.Scalars("loss")] == [2, 4, 6]
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6]


def test_lr_schedules():
    from dchag.training.lr import LRScheduler

    class Opt:
        param_groups = [{"lr": 0.0}]

    def curve(style):
        s = LRScheduler(Opt(), 1.0, 0.1, 2, 6, style)
        out = [s.get_lr()]
        for _ in range(7):
            s.step()
            out.append(Opt.param_groups[0]["lr"])
        return out

    assert curve("constant") == [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    lin = curve("linear")
    assert lin[:3] == [0.5, 1.0, 1.0] and lin[-2:] == [0.1, 0.1]
    assert lin[4] == pytest.approx(0.1 + 0.9 * 0.5)
    cos = curve("cosine")
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[4] == pytest.approx(0.55) and cos[-1] == pytest.approx(0.1)


def test_lr_mult_scales_its_group():
    """A group's lr_mult (--dchag-partial-lr-mult) scales the schedule's rate for that group only."""
    from dchag.training.lr import LRScheduler

    class Opt:
        param_groups = [{"lr": 0.0}, {"lr": 0.0, "lr_mult": 0.1}, {"lr": 0.0, "lr_mult": 0.0}]

    s = LRScheduler(Opt(), 1.0, 0.1, 2, 6, "linear")
    for _ in range(4):
        s.step()
        assert [g["lr"] for g in Opt.param_groups] == pytest.approx([s.get_lr(), 0.1 * s.get_lr(), 0.0])


def test_cli_conflict_exits_nonzero(tmp_path):
    """The command line as users launch it: a conflict is one clear message and exit status 1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           os.path.join(REPO, "pretrain_dchag.py")] + _ds("zero1_fp32.json") + MAE + [
        "--channel-parallel-size", "2", "--train-iters", "2", "--bf16", "--save", str(tmp_path / "ckpt")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    assert proc.returncode != 0
    assert "error: DeepSpeed config" in proc.stderr and "bf16.enabled=False" in proc.stderr, proc.stderr[-3000:]
    # torchrun prints its own ChildFailedError report; the ranks print no traceback of ours.
    assert "ds_config.py" not in proc.stderr and "ConfigError:" not in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "ckpt").exists()


def test_deepspeed_launcher_runs_on_cpu(tmp_path):
    """`deepspeed --num_gpus 2 pretrain_dchag.py --deepspeed --deepspeed_config ...` (the cluster
    form; on CPU --num_gpus is the process count) trains, logs and saves."""
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    cmd = [launcher, "--num_gpus", "2", "--master_port", str(free_port()), os.path.join(REPO, "pretrain_dchag.py")] + \
        _ds("zero1_fp32.json") + MAE + ["--channel-parallel-size", "2", "--train-iters", "2", "--log-interval", "1",
                                        "--save", str(tmp_path / "ckpt")]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path), env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "iteration        2/       2 | consumed samples:            4 |" in out, out[-3000:]
    assert (tmp_path / "ckpt" / "latest").read_text() == "iter_0000002"
    # The MAE picture of held-out tiles, made by every rank (channel-sharded), written by rank 0.
    png = tmp_path / "ckpt" / "reconstruction_iter_0000002.png"
    assert png.stat().st_size > 0 and "saved reconstruction of" in out
