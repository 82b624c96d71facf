"""Pieces of checkpoint conversion that need no training (one process, milliseconds)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from dchag.checkpointing import manifest, normalization
from dchag.checkpointing.shards import channel_rows
from dchag.inference.tiling import tile_starts
from dchag.model.aggregation import build_partial_aggregation
from dchag.model.heads import ChannelReconstructionHead
from dchag.model.tokenizer import ChannelTokenizer
from tests.model_cases import tiny_config


@pytest.mark.parametrize("aggregation,levels", [("linear", 1), ("linear", 2), ("cross", 1), ("cross", 2)])
@pytest.mark.parametrize("P", [1, 2, 4])
def test_channel_rows_rule_matches_the_models_own_shards(aggregation, levels, P):
    """The rule the converter cuts channel-sharded parameters with (no model built for the
    target layout) gives, for every rank, the rows the model's channel-stage modules mark
    themselves with; C = 13 in G = 4 uneven groups (4, 3, 3, 3), tree levels 1 and 2."""
    cfg = tiny_config(aggregation=aggregation, tree_levels=levels)
    partition = cfg.partition(P)
    checked = 0
    for r in range(P):
        channels = partition.rank_channels(r)
        modules = [ChannelTokenizer(channels, 13, 8, 2, 0),
                   build_partial_aggregation(aggregation, partition, r, levels, 8, 2, 0, True),
                   ChannelReconstructionHead(channels, 13, 8, 2, (4, 4), 0, True)]
        for module in modules:
            for name, p in module.named_parameters():
                got = channel_rows(partition, p.channel_global_rows, r)
                assert (got.start, got.stop) == tuple(p.channel_rows), (name, r, got, p.channel_rows)
                checked += 1
    assert checked >= 6 * P


def test_tile_starts_cover_the_edges():
    assert tile_starts(16, 8) == [0, 8]
    assert tile_starts(13, 8) == [0, 5]  # the last tile shifted back to end at the edge
    assert tile_starts(19, 8) == [0, 8, 11]
    assert tile_starts(5, 8) == [0]  # smaller than a tile: padded
    for size in range(1, 40):
        covered = np.zeros(size, bool)
        for s in tile_starts(size, 8):
            covered[s:s + 8] = True
        assert covered.all(), size


def test_manifest_names_a_flipped_bit_and_a_truncation(tmp_path):
    for name, data in (("a.bin", os.urandom(4096)), ("sub/b.json", b"{}")):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(data)
    manifest.write_manifest(str(tmp_path))
    table = json.loads((tmp_path / "manifest.json").read_text())["files"]
    assert sorted(table) == ["a.bin", "sub/b.json"] and table["a.bin"]["size"] == 4096
    assert manifest.verify(str(tmp_path)) == []
    raw = bytearray((tmp_path / "a.bin").read_bytes())
    raw[2000] ^= 0x01  # one bit
    (tmp_path / "a.bin").write_bytes(bytes(raw))
    problems = manifest.verify(str(tmp_path))
    assert len(problems) == 1 and problems[0].startswith("a.bin") and "SHA-256" in problems[0]
    (tmp_path / "sub" / "b.json").write_bytes(b"{")
    problems = manifest.verify(str(tmp_path))
    assert len(problems) == 2 and "sub/b.json is 1 bytes but was saved with 2" in problems[1]
    with pytest.raises(manifest.IntegrityError, match="a.bin"):
        manifest.raise_problems(str(tmp_path), problems)
    (tmp_path / "manifest.json").unlink()
    assert manifest.verify(str(tmp_path), require=False) == []
    assert "no manifest.json" in manifest.verify(str(tmp_path))[0]


def test_normalization_shares_merge_into_all_channels():
    base = {"num_channels": 5, "channel_names": list("abcde"), "wavelengths": None, "data_path": "x",
            "data_format": "npy", "nodata": None, "normalized": True}
    shares = [dict(base, parts=[{"channels": [0, 3], "mean": [1, 2, 3], "std": [1, 1, 2], "count": [9, 9, 9]}]),
              dict(base, parts=[{"channels": [3, 5], "mean": [4, 5], "std": [3, 4], "count": [8, 8]}])]
    doc = normalization.merge(shares)
    assert doc["mean"] == [1, 2, 3, 4, 5] and doc["std"] == [1, 1, 2, 3, 4] and doc["count"] == [9, 9, 9, 8, 8]
    mean, std = normalization.arrays(doc)
    assert mean.dtype == np.float32 and std.tolist() == [1, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="channels"):
        normalization.merge(shares[:1])


def test_every_file_of_an_export_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """The converter's and the export's outputs are staged in a temporary folder and renamed into
    place: every file in it is fsynced before the rename (a crash after it must not leave empty
    files under the new name)."""
    import torch

    from dchag.checkpointing import consolidated
    synced, published = [], []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(src, dst):
        published.append((src, set(synced)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = str(tmp_path / "export")
    consolidated.write(out, {"w": torch.ones(3)}, {"model": {}, "iteration": 1})
    staged, on_disk = next((src, seen) for src, seen in published if os.path.basename(src).startswith(".tmp-export"))
    for name in sorted(os.listdir(out)):
        assert os.path.join(staged, name) in on_disk, (name, sorted(on_disk))
    assert staged in on_disk  # the folder's entries too
