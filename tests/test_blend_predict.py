"""Prediction with a model pretrained on a blend of sources (tools/predict.py, ``load_pretrained``).

One tiny blended D-CHAG-L MAE (the four sources of tests/test_blend_model.py over 13 union channels
named u0..u12 with wavelengths, G = 4: source 'a' of 9 channels, 'b' of 6 sharing three of them, 'c'
of 1 and 'd' of 3, both fewer than G, so their channels repeat over the groups), its weights
perturbed, with per-source normalization statistics, is exported once (as the export of a real run
records it: config, per-source statistics, the run's arguments and the blend) and cut into a
DeepSpeed checkpoint at T = P = 2 (``to_deepspeed``: the same per-rank shards a T = P = 2 save holds,
tests/test_blend_checkpoint.py):

* a file of each source predicts what training's forward of that source gives on the same tiles
  (the source's slots, its statistics, ``source=s``), each channel once, in the source's order;
* bands reversed with their sidecar predict what the original does, in Python and tools/predict.py;
  a source covered partly is refused by name, and zero-filled with --allow-missing-channels; an
  input without identity is taken by position only as the one source of its channel count;
* 2 ranks at T = P = 2 from the --save folder equal 1 process from the export (1e-5);
* the converted checkpoint's dchag_args.json records the channel identity and the blend, and
  --describe lists every source (from the export and from the converted checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.test_blend_model import SOURCES, WAVELENGTHS
from tests.test_predict import _save  # a .npy with its sidecar

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

SOURCE_NAMES = ("a", "b", "c", "d")
UNION = tuple(f"u{u}" for u in range(13))
TILE, MASK_RATIO, SEED = 8, 0.5, 3
ARGV = ["--task", "mae", "--num-channels", "13", "--img-h", "8", "--img-w", "8", "--patch-dim", "2",
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--ffn-hidden-size", "64",
        "--dchag-aggregation", "linear", "--dchag-groups", "4", "--micro-batch-size", "1", "--lr", "1e-3",
        "--seed", "1234", "--train-iters", "5", "--mask-ratio", str(MASK_RATIO),
        "--data-path", "0.4", "a.npy", "0.3", "b.npy", "0.2", "c.npy", "0.1", "d.npy"]


def _env():
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def blend(tmp_path_factory):
    """(folder, the serial model, per-source (mean, std)): ``folder/export`` and ``folder/run`` (T = P = 2)."""
    from dchag.arguments import model_config, parse_args
    from dchag.checkpointing import consolidated, normalization, shards
    from dchag.checkpointing.compat import model_args
    from dchag.checkpointing.convert import to_deepspeed
    from dchag.inference.runtime import build_serial_model
    from tests.model_cases import perturb_
    tmp = tmp_path_factory.mktemp("blend_predict")
    args = parse_args(ARGV)
    args.channel_names, args.wavelengths = list(UNION), list(WAVELENGTHS)
    args.sources, args.source_names = SOURCES, SOURCE_NAMES  # as the data side records a blend
    args.data_sources = [{"name": n, "path": f"{n}.npy", "weight": w, "channels": list(ids), "num_channels": len(ids)}
                         for n, ids, w in zip(SOURCE_NAMES, SOURCES, (0.4, 0.3, 0.2, 0.1))]
    cfg = model_config(args)
    model = build_serial_model(cfg)
    perturb_(model, seed=11)
    model.eval()
    rng = np.random.default_rng(0)
    stats, docs = [], []
    for ids in SOURCES:  # each source its own statistics, also for the channels it shares
        mean, std = rng.uniform(0.1, 0.5, len(ids)), rng.uniform(0.05, 0.2, len(ids))
        stats.append((mean, std))
        docs.append({"normalized": True, "num_channels": len(ids), "channel_names": [UNION[u] for u in ids],
                     "mean": mean.tolist(), "std": std.tolist(), "count": [64] * len(ids)})
    scalars = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, type(None)))}
    training_args = {**scalars, **model_args(args), "data_path": ARGV[ARGV.index("--data-path") + 1:]}
    config = {"model": consolidated.config_to_dict(cfg), "task": "mae", "channel_names": list(UNION),
              "wavelengths": list(WAVELENGTHS), "normalization": normalization.merge_blend(docs, cfg),
              "mask_ratio": MASK_RATIO, "iteration": 5, "consumed_samples": 20, "training_args": training_args,
              "source": {"tensor_model_parallel_size": 2, "channel_parallel_size": 2, "data_parallel_size": 1,
                         "zero_stage": 1, "bf16": False}, "parameters": shards.param_specs(model)}
    consolidated.write(str(tmp / "export"), dict(model.named_parameters()), config)
    to_deepspeed(str(tmp / "export"), str(tmp / "run"), 2, 2)
    return tmp, model, stats


def _scene(s: int, width: int = 2 * TILE, seed: int = 0):
    """[1, C_s, 8, width] raw values near source s's statistics, one invalid value."""
    n = len(SOURCES[s])
    x = np.random.default_rng(seed + s).uniform(0.0, 0.6, (1, n, TILE, width)).astype(np.float32)
    x[0, n - 1, 1, 2] = np.nan
    return x


def _predict(load, data, out, *extra):
    import predict
    return predict.main(["--load", load, "--data-path", data, "--task", "mae", "--output", out, "--mask-ratio",
                         str(MASK_RATIO), "--seed", str(SEED), "--no-progress", *extra])


def _training_forward(model, stats, s: int, x: np.ndarray) -> np.ndarray:
    """What training's step of source s computes on the tiles of ``x`` [1, C_s, 8, 8 k] (tile j hides the
    patches of sample index j): normalized with s's statistics, read as s's slots, ``model(..., source=s)``;
    each channel's first slot, back in data units, NaN where the input was."""
    from dchag.tasks.mae import patch_mask
    mean, std = stats[s]
    z = (x[0] - mean[:, None, None]) / std[:, None, None]
    z = np.where(np.isfinite(x[0]), z, 0.0)
    tiles = np.stack([z[:, :, j * TILE:(j + 1) * TILE] for j in range(x.shape[3] // TILE)])  # [k, C_s, 8, 8]
    slots = list(model.input_channels(s))  # one process: every slot, in order (positions in s's channels)
    mask = patch_mask(torch.arange(len(tiles)), model.cfg.num_patches, MASK_RATIO, SEED, 0)
    with torch.no_grad():
        y = model(torch.from_numpy(tiles[:, slots]).float(), patch_mask=mask, source=s).numpy()
    first = [slots.index(c) for c in range(len(SOURCES[s]))]  # slots repeat a channel in place: its first one
    y = y[:, first] * std[None, :, None, None] + mean[None, :, None, None]
    out = np.concatenate(list(y), axis=2)[None]
    return np.where(np.isfinite(x), out, np.nan)


def test_each_source_predicts_as_its_training_forward(blend, tmp_path, capsys):
    """tools/predict.py on a file of each source (named by its sidecar: 'b' by wavelengths only, the
    others by names) equals training's forward of that source on the same tiles; the output holds the
    source's channels in its order and says which source it ran as."""
    tmp, model, stats = blend
    d = str(tmp_path)
    for s, name in enumerate(SOURCE_NAMES):
        ids = SOURCES[s]
        x = _scene(s)
        by = {"wavelengths": [WAVELENGTHS[u] for u in ids]} if name == "b" else {"names": [UNION[u] for u in ids]}
        data = _save(d, f"scene_{name}", x, by.get("names"), by.get("wavelengths"))
        capsys.readouterr()
        assert _predict(str(tmp / "export"), data, f"{d}/{name}.npy") == 0
        assert f"as source '{name}'" in capsys.readouterr().err
        got, want = np.load(f"{d}/{name}.npy"), _training_forward(model, stats, s, x)
        assert got.shape == x.shape
        np.testing.assert_array_equal(np.isnan(got), np.isnan(x))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        with open(f"{d}/{name}.meta.json") as f:
            meta = json.load(f)
        assert meta["model_source"] == name and meta["channel_names"] == [UNION[u] for u in ids]
    # The union's statistics (the first source's for a shared channel) would give another answer for 'b'.
    assert np.abs(stats[1][0][SOURCES[1].index(7)] - stats[0][0][7]) > 1e-3


def test_reordered_bands_partial_sources_and_inputs_without_identity(blend, tmp_path, capsys):
    """Source 'a' with its bands reversed and named predicts what the original does, in tools/predict.py
    and in Python (``reconstruct(x, channels=...)``, ``as_source('a').reconstruct_tiles``; ``embed`` too); five of its
    nine bands are refused by name, and zero-filled with --allow-missing-channels; a bare array of
    6 channels is taken by position as 'b' (said once), one of 5 channels is refused, naming the sources."""
    import dchag
    tmp, model, stats = blend
    d = str(tmp_path)
    export = str(tmp / "export")
    x = _scene(0, seed=5)
    names = [UNION[u] for u in SOURCES[0]]
    assert _predict(export, _save(d, "orig", x, names), f"{d}/orig_out.npy") == 0
    want = np.load(f"{d}/orig_out.npy")
    rev = list(range(9))[::-1]
    assert _predict(export, _save(d, "rev", x[:, rev], [names[c] for c in rev]), f"{d}/rev_out.npy") == 0
    np.testing.assert_allclose(np.load(f"{d}/rev_out.npy"), want, rtol=0, atol=1e-6)
    pre = dchag.load_pretrained(export, device="cpu")
    got = pre.reconstruct(x[:, rev], channels=[names[c] for c in rev], mask_ratio=MASK_RATIO, seed=SEED)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    tile = pre.as_source("a").reconstruct_tiles(x[..., :TILE], mask_ratio=MASK_RATIO, seed=SEED)
    np.testing.assert_allclose(tile, want[..., :TILE], rtol=0, atol=1e-6)
    emb = pre.embed(x[:, rev], channels=[names[c] for c in rev])  # embed: any model, the source's forward too
    tokens = pre.as_source(0).embed_tiles(x[..., :TILE])  # [1, L, D]
    assert emb.shape == (1, 32, 4, 8)
    np.testing.assert_allclose(emb[0, :, :, :4], tokens[0].T.reshape(32, 4, 4), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="blend of 4 sources.*as_source"):
        pre.reconstruct_tiles(x[..., :TILE])  # which source's channels? not guessed
    # A source covered partly: refused by name; with --allow-missing-channels its missing bands are invalid input.
    keep = [3, 4, 5, 6, 8]
    part = _save(d, "part", x[:, keep], [names[c] for c in keep])
    capsys.readouterr()
    assert _predict(export, part, f"{d}/refused.npy") == 1
    err = capsys.readouterr().err
    assert "lacks 4 of the model's 9 channels (as source 'a'" in err and "'u0'" in err, err
    assert _predict(export, part, f"{d}/filled.npy", "--allow-missing-channels") == 0
    filled = x.copy()
    filled[:, [0, 1, 2, 7]] = np.nan
    np.testing.assert_allclose(np.load(f"{d}/filled.npy"), _training_forward(model, stats, 0, filled), rtol=0,
                               atol=1e-5)
    # No identity: only a channel count that is exactly one source's says which source (by position).
    xb = _scene(1, seed=9)
    assert _predict(export, _save(d, "bare_b", xb), f"{d}/bare_b_out.npy") == 0
    assert "taken by position as source 'b'" in capsys.readouterr().err
    np.testing.assert_allclose(np.load(f"{d}/bare_b_out.npy"), _training_forward(model, stats, 1, xb), rtol=0, atol=1e-5)
    capsys.readouterr()
    pre.reconstruct(xb)
    pre.reconstruct(xb)
    assert capsys.readouterr().err.count("taken by position as source 'b'") == 1
    with pytest.raises(ValueError, match="source 'a' of the model takes 9"):
        pre.as_source("a").reconstruct(xb)  # a view of one source reads inputs as that source only
    assert _predict(export, _save(d, "bare5", x[:, :5]), f"{d}/bare5_out.npy") == 1
    err = capsys.readouterr().err
    assert "'a' 9, 'b' 6, 'c' 1, 'd' 3 channels" in err and "channels.json" in err, err
    assert not os.path.exists(f"{d}/bare5_out.npy")


def test_distributed_prediction_of_a_blend_equals_one_process(blend, tmp_path):
    """2 ranks at T = P = 2 from the --save folder (source 'd': 3 channels in 4 groups, slots u12 u12 |
    u8 u1, u1 borrowed by rank 1) equal one process from the export, with overlapping tiles (1e-5)."""
    from tests.distributed import free_port
    tmp, _, _ = blend
    d = str(tmp_path)
    x = np.random.default_rng(4).uniform(0.0, 0.6, (1, 3, 13, 19)).astype(np.float32)
    x[0, 1, 5, 6] = np.nan
    data = _save(d, "scene_d", x[:, ::-1], [UNION[u] for u in SOURCES[3][::-1]])
    common = ["--overlap", "2", "--batch-size", "3"]
    assert _predict(str(tmp / "export"), data, f"{d}/one.npy", *common) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tools/predict.py", "--load", str(tmp / "run"), "--tensor-model-parallel-size", "2",
           "--channel-parallel-size", "2", "--data-path", data, "--task", "mae", "--output", f"{d}/two.npy",
           "--mask-ratio", str(MASK_RATIO), "--seed", str(SEED), "--no-progress", *common]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("> wrote") == 1, proc.stdout
    got, want = np.load(f"{d}/two.npy"), np.load(f"{d}/one.npy")
    assert got.shape == (1, 3, 13, 19)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    print(f"largest difference from one process {np.nanmax(np.abs(got - want)):.2e}")
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_conversion_records_the_identity_and_describe_lists_every_source(blend):
    """to_deepspeed's dchag_args.json records the union's names and wavelengths and the blend (as a
    training save does); --describe on the export and on the converted checkpoint lists every source."""
    from dchag.checkpointing import describe
    tmp, _, _ = blend
    with open(tmp / "run" / "iter_0000005" / "dchag_args.json") as f:
        margs = json.load(f)
    assert margs["channel_names"] == list(UNION) and margs["wavelengths"] == list(WAVELENGTHS)
    assert margs["sources"] == [list(ids) for ids in SOURCES] and margs["source_names"] == list(SOURCE_NAMES)
    assert [s["name"] for s in margs["data_sources"]] == list(SOURCE_NAMES)
    assert (margs["tensor_model_parallel_size"], margs["channel_parallel_size"]) == (2, 2)
    for path in (tmp / "export", tmp / "run"):
        text = "\n".join(describe.lines(describe.describe(str(path))))
        print(text)
        assert "channels       13: u0, u1, u2, u3, u4, ..., u12" in text and "union of 4 sources" in text, text
        for line in ("source a       9 channel(s): u0, u1, u2, ..., u8 (450-610 nm, 8 with a wavelength); 6 shared",
                     "source b       6 channel(s): u9, u10, u7, ..., u0 (450-670 nm, 6 with a wavelength); 3 shared",
                     "source c       1 channel(s): u5 (550 nm, 1 with a wavelength); 1 shared",
                     "source d       3 channel(s): u12, u8, u1 (470-690 nm, 3 with a wavelength); 2 shared"):
            assert line in text, (line, text)
        assert "weight 0.4; a.npy" in text and "each source's own; 4 sources" in text
