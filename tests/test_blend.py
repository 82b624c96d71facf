"""Blends of data sources, the data side (dchag/data/blend.py, blend_loader.py, the pre-flight's
opening of the sources): --data-path's syntax, the sources' names, the step schedule (shares,
a function of weights, seed and consumed samples only, resume), the union of the sources'
channels, and the refusals. No model: the blended trainings are in tests/test_blend_training.py."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dchag.data.blend import BlendSchedule, parse_data_path, source_name, unique_names
from dchag.data.errors import DataError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FENIX = os.path.join(REPO, "data", "samples", "fenix_450band")


def test_data_path_syntax_is_megatrons():
    spec = parse_data_path(["0.4", "A", "0.3", "B", "0.3", "C"])
    assert spec.paths == ("A", "B", "C") and spec.weights == pytest.approx((0.4, 0.3, 0.3))
    assert parse_data_path(["2", "A", "6", "B"]).weights == pytest.approx((0.25, 0.75))  # normalized
    spec = parse_data_path(["A", "B", "C"])
    assert spec.paths == ("A", "B", "C") and spec.weights is None and spec.is_blend
    assert not parse_data_path("A").is_blend
    for bad, match in ((["0.4", "A", "0.6"], "pairs"), (["0.4", "A", "B", "C"], "stands where a weight"),
                       (["0", "A", "1", "B"], "> 0"), (["-1", "A", "1", "B"], "> 0"),
                       (["A", "0.5", "B"], "looks like a weight"), (["0.5", "A", "0.5", "7"], "where a path")):
        with pytest.raises(DataError, match=match):
            parse_data_path(bad)


def test_source_names_are_file_stems_folder_names_and_unique(tmp_path):
    (tmp_path / "s2.npy").write_bytes(b"")
    (tmp_path / "cube").mkdir()
    assert source_name(str(tmp_path / "s2.npy")) == "s2"
    assert source_name(str(tmp_path / "cube") + "/") == "cube"
    assert source_name(os.path.join(FENIX, "image.hdr")) == "image"
    assert source_name("synthetic:c=13,bands=s2") == "synthetic-s2"
    assert source_name("data/x.h5::grp/refl") == "x-grp-refl"
    assert unique_names(["a/x.npy", "b/x.npy", "synthetic", "synthetic:c=3", "c/x.nc", "synthetic:n=2,c=3"]) == \
        ("x", "x-2", "synthetic", "synthetic-c3", "x-3", "synthetic-c3-2")


def test_each_source_gets_its_weights_share_and_no_source_lags_by_a_step():
    """Over 1,000 samples every source's share is within 3 % of its weight (the issue's test); in
    fact within one step at every step (the greedy rule's bound), at B = 1 and B = 4."""
    for weights in ((0.4, 0.3, 0.3), (0.7, 0.2, 0.1), (0.05, 0.95), (1 / 3, 1 / 3, 1 / 3)):
        for B in (1, 4):
            steps = 1000 // B
            sched = BlendSchedule(weights)
            counts = np.zeros(len(weights))
            for i in range(steps):
                counts[sched.source_at(i)] += 1
                assert np.all(np.abs(counts - np.asarray(weights) * (i + 1)) < 1.0 + 1e-9), (weights, i, counts)
            share = counts * B / (steps * B)
            assert np.all(np.abs(share - np.asarray(weights)) <= 0.03), (weights, B, share)
            assert sched.shares(steps) == pytest.approx(list(share))
    # the rule itself, worked by hand: weights 0.5/0.25/0.25 -> A B C A A B C A ...
    sched = BlendSchedule((0.5, 0.25, 0.25))
    assert [sched.source_at(i) for i in range(8)] == [0, 1, 2, 0, 0, 1, 2, 0]
    assert sched.counts_before(5) == [3, 1, 1]


def test_the_blended_order_depends_on_weights_seed_and_consumed_samples_only():
    """Each step's samples are the same whatever the DP size and micro-batch size (the union of the
    ranks' micro-batches is the global batch blend_global_batch names, in order), and a sampler
    started at consumed samples i B yields what the uninterrupted one yields from step i."""
    from dchag.data.blend_loader import BlendedMicroBatchSampler, blend_global_batch
    weights, sizes, B, seed, steps = (0.4, 0.3, 0.3), (23, 7, 50), 8, 5, 30
    want = [blend_global_batch(i, weights, sizes, B, seed) for i in range(steps)]
    assert {s for s, _ in want} == {0, 1, 2}
    assert blend_global_batch(3, weights, sizes, B, seed + 1) != want[3] or want[3][0] != 0  # the seed matters
    for m, D in ((1, 1), (2, 2), (4, 1), (1, 8), (2, 4)):
        k = B // (m * D)
        per_rank = [list(BlendedMicroBatchSampler(sizes, weights, m, global_batch_size=B, data_parallel_rank=d,
                                                  data_parallel_size=D, seed=seed, num_steps=steps))
                    for d in range(D)]
        for i, (s, ids) in enumerate(want):
            got = []
            for j in range(k):
                for d in range(D):
                    got += per_rank[d][i * k + j]
            assert got == [(s, x) for x in ids], (m, D, i)
    # resume in the middle of the blend: from step 13 on, the same micro-batches
    full = list(BlendedMicroBatchSampler(sizes, weights, 2, global_batch_size=B, data_parallel_size=2,
                                         data_parallel_rank=1, seed=seed, num_steps=steps))
    resumed = list(BlendedMicroBatchSampler(sizes, weights, 2, global_batch_size=B, data_parallel_size=2,
                                            data_parallel_rank=1, seed=seed, consumed_samples=13 * B,
                                            num_steps=steps - 13))
    assert resumed == full[13 * 2:]
    # every sample of a source is drawn once per epoch of that source's own stream
    s1 = [x for s, ids in want for x in ids if s == 1]
    assert sorted(s1[:7]) == list(range(7))
    with pytest.raises(DataError, match="multiple of the global batch size"):
        BlendedMicroBatchSampler(sizes, weights, 2, global_batch_size=B, consumed_samples=4)


def _npy(path, array, names=None, wavelengths=None):
    np.save(path, array.astype(np.float32))
    side = {}
    if names is not None:
        side["channel_names"] = names
    if wavelengths is not None:
        side["wavelengths"] = wavelengths
    if side:
        with open(str(path)[:-4] + ".channels.json", "w") as f:
            json.dump(side, f)
    return str(path)


def _args(argv):
    from dchag.arguments import parse_args
    return parse_args(["--img-h", "8", "--img-w", "8", "--patch-dim", "2", "--train-iters", "2", *argv])


def test_the_preflight_opens_the_sources_and_records_their_union(tmp_path):
    """Three sources (the ENVI cube; 13 named bands; 40 bands with wavelengths only, 5 of them the
    cube's): one union, matched by name then wavelength, recorded in the arguments and the model's config."""
    from dchag.arguments import model_config
    from dchag.data.readers.synthetic import S2_BANDS
    from dchag.training import preflight
    rng = np.random.default_rng(0)
    s2 = _npy(tmp_path / "s2.npy", rng.random((2, 13, 16, 16)), [b[0] for b in S2_BANDS], [b[1] for b in S2_BANDS])
    from dchag.data.readers.open import open_source
    fenix_wl = [float(w) for w in open_source(os.path.join(FENIX, "image.hdr")).wavelengths]
    wl = fenix_wl[:5] + list(np.linspace(2600, 2800, 35))  # 5 shared with the cube by wavelength
    wide = _npy(tmp_path / "wide.npy", rng.random((40, 16, 16)), None, wl)
    args = _args(["--data-path", "0.4", os.path.join(FENIX, "image.hdr"), "0.3", s2, "0.3", wide,
                  "--dchag-groups", "4"])
    found = preflight.run(args, world=1, late_checks=[])
    union = 450 + 13 + 35
    assert found.num_channels == args.num_channels == union
    assert [s["name"] for s in args.data_sources] == ["image", "s2", "wide"]
    assert [s["weight"] for s in args.data_sources] == pytest.approx([0.4, 0.3, 0.3])
    assert args.data_sources[0]["channels"] == list(range(450))
    assert args.data_sources[1]["channels"] == list(range(450, 463))
    assert args.data_sources[2]["channels"] == list(range(5)) + list(range(463, 498))
    assert args.channel_names[450:452] == ["B01", "B02"] and args.wavelengths[452] == 560.0
    assert args.data_sources[0]["train_samples"] + args.data_sources[0]["valid_samples"] >= 8
    cfg = model_config(args, found.num_channels)
    assert cfg.sources[2][:5] == (0, 1, 2, 3, 4) and cfg.source_names == ("image", "s2", "wide")
    json.dumps(args.data_sources)  # recorded in dchag_args.json
    # without weights: in proportion to the training samples
    args = _args(["--data-path", s2, wide, "--dchag-groups", "4"])
    preflight.run(args, world=1, late_checks=[])
    train = [s["train_samples"] for s in args.data_sources]
    assert [s["weight"] for s in args.data_sources] == pytest.approx([t / sum(train) for t in train])
    # one weighted path is one source, the run of that path
    args = _args(["--data-path", "1.0", s2])
    preflight.run(args, world=1, late_checks=[])
    assert args.data_path == s2 and not getattr(args, "data_sources", None)


def test_the_preflight_refuses_what_a_blend_cannot_do(tmp_path):
    from dchag.training import preflight
    rng = np.random.default_rng(1)
    named = _npy(tmp_path / "named.npy", rng.random((13, 16, 16)), [f"b{i}" for i in range(13)], None)
    # generated names (what a reader gives channels it knows nothing of): no identity
    blind = _npy(tmp_path / "blind.npy", rng.random((1, 6, 16, 16)), [f"ch{i:03d}" for i in range(6)], None)
    # a source whose channels carry no identity beside one whose do: named, with the fix
    with pytest.raises(DataError, match=r"data source blind \(.*blind.npy\): its channels have neither names nor "
                                        r"wavelengths.*sidecar JSON"):
        preflight.run(_args(["--data-path", named, blind, "--dchag-groups", "2"]), world=1, late_checks=[])
    # another task, a fine-tune, a wrong --num-channels, a synthetic source without its count: all at once
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(_args(["--data-path", named, "synthetic:n=4", "--task", "forecast"]), world=1, late_checks=[])
    assert "a blend pretrains (--task mae)" in str(e.value) and "synthetic:c=16" in str(e.value)
    with pytest.raises(preflight.PreflightError) as e:
        preflight.run(_args(["--data-path", named, "synthetic:c=5,n=4", "--num-channels", "13",
                             "--finetune", "--pretrained-checkpoint", str(tmp_path)]), world=1)
    assert "distinct channels" in str(e.value) and "give 18" in str(e.value)
    assert "a fine-tune reads one source" in str(e.value)


def test_each_rank_reads_its_slots_of_each_source_and_the_loss_counts_a_channel_once(tmp_path):
    """The blend's datasets on channel-parallel ranks 0 and 1 of P = 2, G = 4: a 6-band source (its
    groups as for one source), a 3-band source (C < G: bands repeated into 4 slots, read once per
    rank and indexed) and a 1-band source (one band in every slot). Each rank's images are the
    source's own channels at its slots, normalized with the source's statistics; the channel
    weights score each channel once over the ranks; the MAE error sums leave the repeats out."""
    from types import SimpleNamespace

    import torch

    from dchag.arguments import model_config
    from dchag.data.blend_loader import build_blend
    from dchag.data.build import build_datasets
    from dchag.tasks.mae import error_sums
    from dchag.training import preflight
    rng = np.random.default_rng(2)
    six = _npy(tmp_path / "six.npy", rng.random((6, 16, 16)) * 5 + 3, None, list(np.linspace(400, 900, 6)))
    three = _npy(tmp_path / "three.npy", rng.random((3, 16, 16)), ["r", "g", "b"], None)
    one = _npy(tmp_path / "one.npy", rng.random((1, 16, 16)), ["pan"], None)
    args = _args(["--data-path", six, three, one, "--dchag-groups", "4", "--channel-parallel-size", "2",
                  "--tensor-model-parallel-size", "2", "--micro-batch-size", "1", "--global-batch-size", "2",
                  "--eval-iters", "1"])
    found = preflight.run(args, world=2, late_checks=[])
    cfg = model_config(args, found.num_channels)
    lay = cfg.source_layout(2)
    assert [lay.rank_source_channels(1, r) for r in (0, 1)] == [(0, 0), (1, 2)]
    assert [lay.rank_source_channels(2, r) for r in (0, 1)] == [(0, 0), (0, 0)]
    got = {}
    for r in (0, 1):
        train, valid = build_blend(args, cfg, r, 0, 1, 0)
        for s, part in enumerate(train.dataset.parts):
            item = part[0]
            want, _ = build_datasets(args.data_sources[s]["path"], task="mae", img_h=8, img_w=8,
                                     valid_fraction=args.valid_fraction)
            full = want[0]["images"]  # every channel of the source, its statistics (P = 1)
            assert torch.equal(item["images"], full[list(lay.rank_source_channels(s, r))]), (s, r)
            assert item["source"].item() == s
            got.setdefault(s, []).append(item["channel_weight"])
        batches = list(valid())
        assert {int(b["source"][0]) for b in batches} == {0, 1, 2}  # every source's held-out samples, one per batch
    for s in range(3):  # each channel scored once over the ranks
        scored = [c for r in (0, 1) for c, w in zip(lay.rank_source_channels(s, r), got[s][r]) if w == 1]
        assert sorted(scored) == list(range(len(args.data_sources[s]["channels"]))), s
    # the loss of the 3-band source's slots (r r g b) with the repeat weighted 0 = the loss over r, g, b
    x, pred = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    x[:, 1], pred[:, 1] = x[:, 0], pred[:, 0] + 1.0  # the repeat (wrongly) predicted differently: left out
    valid_px, mask = torch.ones_like(x, dtype=torch.bool), torch.rand(2, 16) < 0.5
    w = torch.tensor([[1.0, 0.0, 1.0, 1.0]] * 2)
    keep = [0, 2, 3]
    assert torch.allclose(error_sums(pred, x, valid_px, mask, (4, 4), 2, w),
                          error_sums(pred[:, keep], x[:, keep], valid_px[:, keep], mask, (4, 4), 2))


def test_the_blend_benchmark_attributes_each_iteration_to_its_source():
    """tools/blend_benchmark.py's figures: a blended iteration counts for the source it read (the
    schedule's), warm-up iterations of every source left out; medians and peaks per source."""
    from dchag.bench.blend import report_markdown, summarize
    sources = [(0.5, "a.npy"), (0.25, "b.npy"), (0.25, "c.npy")]  # order A B C A A B C A
    blend_ms = {i: 100.0 * i for i in range(1, 9)}
    blend_mb = {i: 500.0 + i for i in range(1, 9)}
    raw = {"blend": {"iteration_ms": blend_ms, "peak_memory_mb": blend_mb}}
    for n, base in (("a", 10.0), ("b", 20.0), ("c", 30.0)):
        raw[f"alone {n}"] = {"iteration_ms": {1: 999.0, 2: base, 3: base + 2}, "peak_memory_mb": {1: 900.0, 2: 400.0,
                                                                                                 3: 401.0}}
    out = summarize(raw, sources, warmup=1)
    a, b, c = out["rows"]
    assert a["blend"]["iterations"] == 3 and a["blend"]["ms_median"] == 500.0  # A at 1, 4, 5, 8: 4, 5, 8 kept
    assert b["blend"]["ms_median"] == 600.0 and c["blend"]["ms_median"] == 700.0  # B at 2, 6; C at 3, 7
    assert a["alone"]["ms_median"] == 11.0 and a["alone"]["peak_mb"] == 401.0  # the warm-up's 999 / 900 left out
    assert out["blend"]["peak_mb"] == 508.0 and out["blend"]["iterations"] == 5
    assert "| a | 0.5 | 11 | 500 |" in report_markdown(out, "cmd")
