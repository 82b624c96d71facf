"""Checkpoint conversion, integrity and the trained model outside the cluster.

Jobs (tiny D-CHAG-L MAE of tests/test_training.py: 13 channels in G = 4 uneven groups 4,3,3,3):

* 2 ranks, T = P = 2: ZeRO 1 fp32, ZeRO 3 fp32 and ZeRO 1 bf16 runs of 4 iterations (saved at 3
  and 4); each returns its losses, its full parameters and its output on a fixed batch. The
  refusals of damaged checkpoints (a truncated file, one flipped bit inside a tensor) and of a
  weights-only checkpoint loaded without --no-load-optim run here too.
* conversions in one plain process (no launcher): every iteration-3 checkpoint -> consolidated
  -> DeepSpeed at T = P = 1 and at T = 4, P = 2 (channel rows 7 | 6 of 13); ZeRO 1 -> universal.
* 4 ranks: the continuations (--no-load-optim), T = P = 1 as DP 4 and T = 4, P = 2, under
  other ZeRO stages than the source; --no-load-optim on the original ZeRO 3 checkpoint
  (T = P = 2 x DP 2); the universal checkpoint on T = 4, P = 2. Their first loss (iteration 4) is computed with the
  iteration-3 weights on the same data and masks as the source run's iteration 4, so each
  equals the source run's own loss there: weights, iteration and consumed samples all survived.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from tests.distributed import run_distributed
from tests.test_training import MAE, REPO, _ds, _refused

ITERS, SAVE_AT = 4, 3
# The layout is given per run; global batch 4 = micro 2 x 2 accumulation at T = 2 on 2 ranks, micro 1 x DP 4
# at T = 1 on 4 ranks, micro 1 x 4 accumulation at T = 4.
_T = MAE.index("--tensor-model-parallel-size")
BASE = MAE[:_T] + MAE[_T + 2:] + ["--global-batch-size", "4"]
SOURCES = {"z1": "zero1_fp32.json", "z3": "zero3_fp32.json", "bf16": "zero1_bf16.json"}
# Where each source continues (target ZeRO stages differ from the source's on purpose).
TARGETS = {"t1": (1, 1, "zero3"), "t4": (4, 2, "zero1")}


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def _fixed_batch():
    gen = torch.Generator().manual_seed(7)
    return torch.randn(2, 13, 8, 8, generator=gen)


def _fixed_mask():
    from dchag.tasks.mae import patch_mask
    return patch_mask(torch.arange(2), 16, 0.5, 99, 0)


def _train(argv, outputs=False):
    """One run of the real entry point; with ``outputs`` also the trained model's output on the
    fixed batch (every rank runs its channels; gathered over the channel group)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    import pretrain_dchag
    from dchag.parallel.state_dict import full_state_dict
    from dchag.training import pretrain, release
    history = pretrain(pretrain_dchag.model_provider, pretrain_dchag.forward_step, pretrain_dchag.datasets_provider,
                       argv)
    out = {"losses": history["losses"]}
    if outputs:
        module = history["engine"].module
        module.eval()
        with torch.no_grad():
            y = module(_fixed_batch()[:, module.channels].to(module.tokenizer.weight.dtype), patch_mask=_fixed_mask())
        parts = [None] * ps.get_channel_parallel_world_size()
        dist.all_gather_object(parts, y.float(), group=ps.get_channel_parallel_group())
        out["output"] = torch.cat(parts, dim=1)
        out["params"] = full_state_dict(module)
    release(history)
    return out


def _flip_bit_inside_a_tensor(path):
    """Flip one bit in the middle of the largest tensor's bytes of a torch zip file."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = np.frombuffer(f.read(4), dtype="<u2")
        offset = info.header_offset + 30 + int(name_len) + int(extra_len) + info.file_size // 2
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x10]))


def _source_job(tmp):
    import shutil
    import torch.distributed as dist
    r = {}
    for key, json_name in SOURCES.items():
        r[key] = _train(_ds(json_name) + BASE + ["--tensor-model-parallel-size", "2", "--channel-parallel-size", "2",
                                                 "--train-iters", str(ITERS), "--save", os.path.join(tmp, key),
                                                 "--save-interval", str(SAVE_AT)], outputs=True)
    # Damaged copies of the ZeRO 1 checkpoint: --load refuses them, naming the file.
    src = os.path.join(tmp, "z1", "iter_0000004")
    for kind in ("flip", "truncate"):
        if dist.get_rank() == 0:
            dst = os.path.join(tmp, kind, "iter_0000004")
            shutil.copytree(src, dst)
            with open(os.path.join(tmp, kind, "latest"), "w") as f:
                f.write("iter_0000004")
            target = os.path.join(dst, "zero_pp_rank_0_mp_rank_01_optim_states.pt")
            if kind == "flip":
                _flip_bit_inside_a_tensor(target)
            else:
                with open(target, "r+b") as f:
                    f.truncate(os.path.getsize(target) - 100)
        dist.barrier()
        r[f"err_{kind}"] = _refused(_ds("zero1_fp32.json") + BASE + [
            "--tensor-model-parallel-size", "2", "--channel-parallel-size", "2", "--train-iters", "6",
            "--load", os.path.join(tmp, kind)])
    return r


def _continue_job(tmp):
    r = {}
    for src in SOURCES:
        for tgt, (T, P, stage) in TARGETS.items():
            precision = "bf16" if src == "bf16" else "fp32"
            argv = _ds(f"{stage}_{precision}.json") + BASE + [
                "--tensor-model-parallel-size", str(T), "--channel-parallel-size", str(P), "--micro-batch-size", "1",
                "--train-iters", str(ITERS), "--load", os.path.join(tmp, f"{src}_{tgt}")]
            r[f"{src}_{tgt}"] = _train(argv + ["--no-load-optim"])
            if src == "z1" and tgt == "t4":
                r["err_no_flag"] = _refused(argv)
    # --no-load-optim on an original (not converted) ZeRO 3 checkpoint, same T = P = 2 with DP 2 under ZeRO 1.
    r["native_z3"] = _train(_ds("zero1_fp32.json") + BASE + [
        "--tensor-model-parallel-size", "2", "--channel-parallel-size", "2", "--micro-batch-size", "1",
        "--train-iters", str(ITERS), "--load", os.path.join(tmp, "z3"), "--ckpt-step", str(SAVE_AT), "--no-load-optim"])
    # DeepSpeed's universal format (optimizer state included), found by --load without a JSON edit.
    r["universal"] = _train(_ds("zero1_fp32.json") + BASE + [
        "--tensor-model-parallel-size", "4", "--channel-parallel-size", "2", "--micro-batch-size", "1",
        "--train-iters", str(ITERS), "--load", os.path.join(tmp, "z1_universal")])
    return r


CONVERT = """
import sys
from dchag.checkpointing import convert
tmp = sys.argv[1]
for src in ("z1", "z3", "bf16"):
    convert.export_consolidated(f"{tmp}/{src}/iter_0000003", f"{tmp}/{src}_c3")
    for tgt, T, P in (("t1", 1, 1), ("t4", 4, 2)):
        convert.to_deepspeed(f"{tmp}/{src}_c3", f"{tmp}/{src}_{tgt}", T, P)
for src in ("z1", "z3", "bf16"):  # RUN: its latest checkpoint, iteration 4 (the trained model)
    convert.export_consolidated(f"{tmp}/{src}", f"{tmp}/{src}_c4")
convert.to_universal(f"{tmp}/z1/iter_0000003", f"{tmp}/z1_universal")
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("convert"))
    src = run_distributed(_source_job, 2, tmp)
    proc = subprocess.run([sys.executable, "-c", CONVERT, tmp], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cont = run_distributed(_continue_job, 4, tmp)
    return tmp, src, cont, proc.stdout


def _tool(*args):
    return subprocess.run([sys.executable, os.path.join(REPO, "tools", "convert_checkpoint.py"), *args], cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)


# ----------------------------------------------------------------------------------------------


def test_consolidated_export_is_every_full_parameter(job):
    """From T = P = 2 under ZeRO 1 and ZeRO 3 (fp32): the export equals the trained model's full
    parameters exactly; from bf16: the fp32 master weights, which round to the model's bf16 ones."""
    from safetensors.torch import load_file
    tmp, src, _, _ = job
    for key in SOURCES:
        want = src[0][key]["params"]
        got = load_file(os.path.join(tmp, f"{key}_c4", "model.safetensors"))
        assert set(got) == set(want), key
        for name in want:
            assert got[name].dtype == torch.float32, name
            if key == "bf16":
                assert torch.equal(got[name].bfloat16(), want[name]), name
            else:
                assert torch.equal(got[name], want[name]), (key, name)
    bf16 = load_file(os.path.join(tmp, "bf16_c4", "model.safetensors"))
    assert any(not torch.equal(t, t.bfloat16().float()) for t in bf16.values()), "fp32 masters, not bf16 copies"


def test_config_carries_model_normalization_and_source(job):
    """config.json: hyperparameters, the normalization statistics training applied (checked
    against a plain numpy mean/std of the synthetic data), iteration, source layout, versions."""
    from dchag.data import open_source
    tmp, _, _, _ = job
    with open(os.path.join(tmp, "z1_c3", "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model"]["num_channels"] == 13 and cfg["model"]["groups"] == 4 and cfg["aggregation"] == "linear"
    assert cfg["iteration"] == 3 and cfg["consumed_samples"] == 3 * 4 and cfg["lr_scheduler"]["num_steps"] == 3
    assert cfg["source"]["tensor_model_parallel_size"] == 2 and cfg["source"]["channel_parallel_size"] == 2
    assert cfg["source"]["zero_stage"] == 1 and cfg["versions"]["safetensors"]
    norm = cfg["normalization"]
    src = open_source("synthetic:num_images=48", num_channels=13, height=8, width=8, seed=1234)
    x = np.stack([src.read(i, range(13)) for i in range(4)]).astype(np.float64)  # the 4 images stats use
    np.testing.assert_allclose(norm["mean"], x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(norm["std"], x.std(axis=(0, 2, 3)), rtol=1e-6)
    assert cfg["channel_names"] == src.channel_names and len(cfg["wavelengths"]) == 13
    with open(os.path.join(tmp, "z1", "iter_0000003", "normalization.json")) as f:
        assert json.load(f)["mean"] == norm["mean"], "every training checkpoint carries the statistics"
    # Nothing in the export needs pickle: safetensors + JSON only (and the manifest).
    assert sorted(os.listdir(os.path.join(tmp, "z1_c3"))) == ["config.json", "manifest.json", "model.safetensors"]


@pytest.mark.parametrize("src", list(SOURCES))
def test_converted_checkpoints_continue_on_other_layouts(job, src):
    """T = P = 2 -> consolidated -> T = P = 1 and T = 4, P = 2 (--no-load-optim): the first
    continued loss (iteration 4) equals the source run's iteration-4 loss (same weights, data
    position and masks), and the two layouts equal each other, within 1e-5 (fp32) / bf16 rounding."""
    _, srcr, cont, _ = job
    ref = srcr[0][src]["losses"][SAVE_AT + 1]
    tol = 2e-2 if src == "bf16" else 1e-5
    first = {}
    for tgt in TARGETS:
        losses = cont[0][f"{src}_{tgt}"]["losses"]
        assert sorted(losses) == [SAVE_AT + 1], "the iteration is kept: only iteration 4 runs"
        first[tgt] = losses[SAVE_AT + 1]
        assert abs(first[tgt] - ref) <= tol * abs(ref), (src, tgt, first[tgt], ref)
    assert abs(first["t1"] - first["t4"]) <= tol * abs(first["t1"]), first
    print(f"{src}: source iteration 4 loss {ref:.8f}; continued T=P=1 {first['t1']:.8f}, T=4,P=2 {first['t4']:.8f}")


def test_universal_conversion_continues_without_json_edit(job):
    _, srcr, cont, _ = job
    ref = srcr[0]["z1"]["losses"][SAVE_AT + 1]
    got = cont[0]["universal"]["losses"]
    assert sorted(got) == [SAVE_AT + 1] and abs(got[SAVE_AT + 1] - ref) <= 1e-5 * abs(ref), (got, ref)


def test_no_load_optim_on_an_original_checkpoint(job):
    """Weights only from the source run's own ZeRO 3 files (fp32 master weights gathered over
    its model-parallel ranks' shards): the same first loss as the source run's iteration 4."""
    _, srcr, cont, _ = job
    ref = srcr[0]["z3"]["losses"][SAVE_AT + 1]
    got = cont[0]["native_z3"]["losses"]
    assert sorted(got) == [SAVE_AT + 1] and abs(got[SAVE_AT + 1] - ref) <= 1e-5 * abs(ref), (got, ref)


def test_weights_only_checkpoint_needs_no_load_optim(job):
    _, _, cont, _ = job
    kind, msg, _ = cont[0]["err_no_flag"]
    assert kind == "CheckpointError" and "--no-load-optim" in msg and "optimizer state" in msg, msg


def test_damaged_checkpoint_is_refused_by_name(job, tmp_path):
    """A bit flipped inside a tensor and a truncated file: --load (every rank), the converter
    and --verify each refuse, naming the file; the intact checkpoint verifies."""
    tmp, src, _, _ = job
    bad = "zero_pp_rank_0_mp_rank_01_optim_states.pt"
    for kind in ("flip", "truncate"):
        for r in src:
            err, msg, _ = r[f"err_{kind}"]
            assert err == "IntegrityError" and bad in msg, msg
        proc = _tool("--load-dir", os.path.join(tmp, kind), "--verify")
        assert proc.returncode == 1 and "DAMAGED" in proc.stdout and bad in proc.stdout, proc.stdout + proc.stderr
        assert ("SHA-256" if kind == "flip" else "truncated") in proc.stdout
        proc = _tool("--load-dir", os.path.join(tmp, kind), "--save-dir", str(tmp_path / kind), "--format",
                     "consolidated")
        assert proc.returncode == 1 and bad in proc.stderr and not (tmp_path / kind).exists(), proc.stderr
    proc = _tool("--load-dir", os.path.join(tmp, "z1"), "--verify")
    assert proc.returncode == 0 and proc.stdout.count("OK") == 2, proc.stdout + proc.stderr
    proc = _tool("--load-dir", os.path.join(tmp, "z1_c3"), "--save-dir", os.path.join(tmp, "z1_t1"), "--format",
                 "deepspeed")
    assert proc.returncode == 1 and "not empty" in proc.stderr, "an existing output is never overwritten"
    assert not [n for n in os.listdir(tmp) if n.startswith(".tmp")], "no half-written output is left behind"


def test_load_pretrained_equals_the_distributed_model(job):
    """dchag.load_pretrained in a plain process (no launcher): the T = P = 2 model's output on
    the same normalized batch and mask, within 1e-6; reconstruct() on raw values normalizes with
    the saved statistics and returns data units, invalid inputs left NaN."""
    tmp, src, _, _ = job
    want = src[0]["z1"]["output"]
    code = f"""
import torch, numpy as np, dchag
from tests.test_checkpoint_convert import _fixed_batch, _fixed_mask
m = dchag.load_pretrained({os.path.join(tmp, 'z1_c4')!r}, device="cpu")
y = m.forward_normalized(_fixed_batch(), patch_mask=_fixed_mask())
raw = _fixed_batch().numpy() * m.std[None, :, None, None] + m.mean[None, :, None, None]
rec, mask = m.reconstruct(raw, mask_ratio=0.5, seed=99, return_mask=True)
raw[0, 5, 1, 1] = np.nan
rec_nan = m.reconstruct(raw, mask_ratio=0.5, seed=99)
emb = m.embed_tiles(raw)
torch.save({{"y": y, "rec": rec, "rec_nan": rec_nan, "mask": mask, "emb": emb, "mean": m.mean, "std": m.std}},
           {os.path.join(tmp, 'pretrained.pt')!r})
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = torch.load(os.path.join(tmp, "pretrained.pt"), weights_only=False)
    err = (out["y"] - want).abs().max().item()
    print(f"load_pretrained vs the T = P = 2 model: largest output difference {err:.3e}")
    assert err <= 1e-6
    assert torch.equal(out["mask"], _fixed_mask())
    expect = want.numpy() * out["std"][None, :, None, None] + out["mean"][None, :, None, None]
    np.testing.assert_allclose(out["rec"], expect, rtol=1e-4, atol=1e-4)
    assert np.isnan(out["rec_nan"][0, 5, 1, 1]) and np.isnan(out["rec_nan"]).sum() == 1
    assert out["emb"].shape == (2, 16, 32)


TILES = """
import sys, numpy as np, torch, dchag
m = dchag.load_pretrained(sys.argv[1], device="cpu")
x = np.load(sys.argv[2])
rows, cols = (0, 5), (0, 8, 11)  # 13 x 19 in 8 x 8 tiles: the last row/column of tiles shifted to the edge
rec = np.zeros_like(x); emb = np.zeros((2, 32, 6, 9), np.float32)
k = 0
for i in range(2):
    for r in rows:
        for c in cols:
            tile = x[i:i + 1, :, r:r + 8, c:c + 8]
            rec[i, :, r:r + 8, c:c + 8] = m.reconstruct(tile, mask_ratio=0.5, seed=5, sample_index=[k])[0]
            k += 1
for i in range(2):  # embed: 6 x 9 whole 2 x 2 patches (the 13th row / 19th column have none)
    for r in (0, 4):
        for c in (0, 8, 10):
            tile = x[i:i + 1, :, r:r + 8, c:c + 8]
            emb[i, :, r // 2:r // 2 + 4, c // 2:c // 2 + 4] = m.embed_tiles(tile)[0].T.reshape(32, 4, 4)
np.save(sys.argv[3], rec); np.save(sys.argv[4], emb)
"""


def test_predict_over_a_file_equals_tile_by_tile_forwards(job, tmp_path):
    """tools/predict.py on a 2 x 13 x 13 x 19 .npy (edges that do not fill an 8 x 8 tile, invalid
    values): equals reconstruct()/embed() tile by tile, stitched by hand; invalid inputs stay
    NaN; a token whose patch holds no valid value is NaN; the PNG is written; the output is
    never overwritten."""
    import zarr
    tmp, _, _, _ = job
    x = np.random.RandomState(0).normal(0.5, 0.2, (2, 13, 13, 19)).astype(np.float32)
    x[0, 3, 12, 18] = np.nan
    x[1, :, 2:4, 2:4] = np.nan  # the whole patch (1, 1) of image 1
    data = str(tmp_path / "cube.npy")
    np.save(data, x)
    export = os.path.join(tmp, "z1_c4")
    run = lambda *a: subprocess.run([sys.executable, os.path.join(REPO, "tools", "predict.py"), "--load", export,
                                     "--data-path", data, *a], cwd=REPO, env=_env(), capture_output=True, text=True,
                                    timeout=300)
    proc = run("--task", "mae", "--mask-ratio", "0.5", "--seed", "5", "--batch-size", "5", "--output",
               str(tmp_path / "rec.npy"), "--picture", str(tmp_path / "rec.png"))
    assert proc.returncode == 0 and "predict mae" in proc.stderr, proc.stderr[-3000:]
    proc = run("--task", "embed", "--output", str(tmp_path / "emb.zarr"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-c", TILES, export, data, str(tmp_path / "want_rec.npy"),
                           str(tmp_path / "want_emb.npy")], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec, want = np.load(tmp_path / "rec.npy"), np.load(tmp_path / "want_rec.npy")
    assert rec.shape == x.shape
    np.testing.assert_array_equal(np.isnan(rec), np.isnan(x))
    np.testing.assert_allclose(rec, want, rtol=1e-5, atol=1e-6)
    emb, want = np.asarray(zarr.open_array(str(tmp_path / "emb.zarr"), mode="r")), np.load(tmp_path / "want_emb.npy")
    assert emb.shape == (2, 32, 6, 9)
    assert np.isnan(emb[1, :, 1, 1]).all() and np.isnan(emb).sum() == 32
    ok = ~np.isnan(emb)
    np.testing.assert_allclose(emb[ok], want[ok], rtol=1e-5, atol=1e-6)
    assert (tmp_path / "rec.png").stat().st_size > 1000
    proc = run("--task", "mae", "--output", str(tmp_path / "rec.npy"))
    assert proc.returncode == 1 and "already exists" in proc.stderr


def test_distributed_prediction_equals_one_process(job, tmp_path):
    """tools/predict.py under torchrun: 2 ranks at T = P = 2 from the training's --save folder (ZeRO 1,
    shards merged as conversion merges them, each rank its shard, its channels) equal 1 process on
    the export (1e-5), with overlapping tiles; 2 data-parallel ranks sharing the tiles (embed, from
    the export) equal it too."""
    from tests.distributed import free_port
    tmp, _, _, _ = job
    x = np.random.RandomState(3).normal(0.5, 0.2, (2, 13, 21, 19)).astype(np.float32)
    x[0, 3, 12, 18] = np.nan
    data = str(tmp_path / "scene.npy")
    np.save(data, x)
    common = ["--data-path", data, "--mask-ratio", "0.5", "--seed", "5", "--batch-size", "3", "--overlap", "2",
              "--no-progress"]
    one = f"""
import sys
sys.path.insert(0, "tools")
import predict
for task in ("mae", "embed"):
    assert predict.main(["--load", {os.path.join(tmp, 'z1_c4')!r}, "--task", task, "--output",
                         {str(tmp_path)!r} + f"/one_{{task}}.npy", *{common!r}]) == 0
import dchag, torch  # one process loads the --save folder too (any layout), the same model
from tests.test_checkpoint_convert import _fixed_batch, _fixed_mask
a, b = (dchag.load_pretrained(p, device="cpu") for p in ({os.path.join(tmp, 'z1')!r}, {os.path.join(tmp, 'z1_c4')!r}))
assert torch.equal(a.forward_normalized(_fixed_batch(), _fixed_mask()), b.forward_normalized(_fixed_batch(), _fixed_mask()))
"""
    proc = subprocess.run([sys.executable, "-c", one], cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, load, task, layout in (("tp", "z1", "mae", ["--tensor-model-parallel-size", "2",
                                                           "--channel-parallel-size", "2"]),
                                     ("dp", "z1_c4", "embed", [])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "tools/predict.py", "--load", os.path.join(tmp, load), "--task", task, "--output",
               str(tmp_path / f"{name}.npy"), *layout, *common]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        assert proc.stdout.count("> wrote") == 1, proc.stdout  # one output, written by rank 0
        got, want = np.load(tmp_path / f"{name}.npy"), np.load(tmp_path / f"one_{task}.npy")
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        print(f"{name}: largest difference from one process {np.nanmax(np.abs(got - want)):.2e}")
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_describe_says_what_a_checkpoint_is_without_loading_it(job, monkeypatch):
    """--describe on the export, the --save folder and one iter_* folder: task, architecture, layout
    and iteration, channels, tile, data, normalization, size; no pickle or tensor file is opened."""
    import builtins
    from dchag.checkpointing import describe
    tmp, _, _, _ = job
    real_open = builtins.open

    def guarded(file, *a, **k):
        assert not str(file).endswith((".pt", ".safetensors")), f"--describe opened {file}"
        return real_open(file, *a, **k)

    monkeypatch.setattr(builtins, "open", guarded)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("--describe loaded a pickle"))
    for path, it in ((os.path.join(tmp, "z1_c4"), 4), (os.path.join(tmp, "z1"), 4),
                     (os.path.join(tmp, "z1", "iter_0000003"), 3)):
        text = "\n".join(describe.lines(describe.describe(path)))
        print(text)
        for words in (f"iteration {it}", "task           mae", "D-CHAG-L (linear), G = 4 groups", "T = 2, P = 2",
                      "channels       13", "tile           8 x 8 pixels, patches of 2 x 2", "normalization  per-channel",
                      "size on disk"):
            assert words in text, (words, text)
        assert "consolidated export" in text if path.endswith("c4") else "DeepSpeed" in text
    text = "\n".join(describe.lines(describe.describe(os.path.join(tmp, "z1_c4"))))
    assert "mask ratio 0.5" in text and "ZeRO 1" in text and "parameters" in text
    monkeypatch.setattr(builtins, "open", real_open)
    proc = _tool("--describe", os.path.join(tmp, "z1"))
    assert proc.returncode == 0 and "iteration 4" in proc.stdout, proc.stderr[-2000:]
    proc = _tool("--describe", tmp)
    assert proc.returncode == 1 and "neither a consolidated export nor a checkpoint" in proc.stderr, proc.stderr
