"""The channel layout of a blend of sources (dchag/parallel/sources.py) and the identity matching
that builds it (dchag/data/identity.py): pure arithmetic, checked against hand-worked layouts."""

import pytest

from dchag.data.errors import DataError
from dchag.data.identity import ChannelId, channel_ids, match_to, union_of
from dchag.model.config import DChagConfig
from dchag.parallel.partition import LayoutError
from dchag.parallel.sources import SourceLayout, expand_slots, runs


def test_one_source_is_the_partition_unchanged():
    for C, G, P in ((16, 4, 2), (13, 4, 4), (450, 8, 2), (5, 5, 1)):
        lay = SourceLayout(C, None, G, P)
        cfg = DChagConfig(num_channels=C, img_h=4, img_w=4, patch_dim=2, groups=G)
        for r in range(P):
            want = cfg.partition(P).rank_channels(r)
            assert lay.rank_slots(0, r) == tuple(want)
            assert lay.home_ids(r) == tuple(want)
            assert lay.contiguous_home_rows(0, r) == range(len(want))
        assert lay.borrowed(0) == ()


def test_slots_repeat_a_source_with_fewer_channels_than_groups():
    assert expand_slots((7, 8, 9, 10), 8) == (7, 7, 8, 8, 9, 9, 10, 10)
    assert expand_slots((3,), 4) == (3, 3, 3, 3)
    assert expand_slots((1, 2, 3), 2, sub_groups=2) == (1, 1, 2, 3)
    assert expand_slots(tuple(range(9)), 4) == tuple(range(9))


def test_homes_borrowing_and_scored_slots():
    # union 0..5; source 0 = [0, 1, 2, 3], source 1 = [3, 4, 5, 0] (0 and 3 shared); G = 2, P = 2
    lay = SourceLayout(6, ((0, 1, 2, 3), (3, 4, 5, 0)), groups=2, channel_parallel_size=2)
    assert lay.rank_slots(0, 0) == (0, 1) and lay.rank_slots(0, 1) == (2, 3)
    assert lay.rank_slots(1, 0) == (3, 4) and lay.rank_slots(1, 1) == (5, 0)
    assert lay.home == (0, 0, 1, 1, 0, 1)  # 4 first met on rank 0, 5 on rank 1
    assert lay.home_ids(0) == (0, 1, 4) and lay.home_ids(1) == (2, 3, 5)
    assert lay.borrowed(0) == () and lay.borrowed(1) == (0, 3)
    assert lay.row_plan(1, 0) == (("borrowed", 1), ("home", 2))
    assert lay.row_plan(1, 1) == (("home", 2), ("borrowed", 0))
    assert lay.contiguous_home_rows(1, 0) is None
    assert lay.rank_source_channels(1, 1) == (2, 3)
    # a 1-band source under G = 2: both groups hold the one band; it is scored once
    small = SourceLayout(3, ((0, 1), (2,)), groups=2, channel_parallel_size=2)
    assert small.rank_slots(1, 0) == (2,) and small.rank_slots(1, 1) == (2,)
    assert small.scored_slots(1, 0) == (True,) and small.scored_slots(1, 1) == (False,)
    assert small.home[2] == 0 and small.borrowed(1) == (2,)


def test_layout_errors_name_the_source():
    with pytest.raises(LayoutError, match="data source 1"):
        SourceLayout(7, ((0, 1, 2, 3), (4, 5, 6)), groups=2, channel_parallel_size=2, aggregation="flat")
    with pytest.raises(LayoutError, match="belongs to no data source"):
        SourceLayout(5, ((0, 1), (2, 3)), groups=2)
    cfg = DChagConfig(num_channels=6, img_h=4, img_w=4, patch_dim=2, groups=4, sources=((0, 1, 2, 3, 4), (5,)))
    assert cfg.source_layout(2).rank_slots(1, 1) == (5, 5)
    with pytest.raises(LayoutError):
        cfg.validate_layout(2, 3)
    assert runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)]


def test_union_by_name_then_wavelength():
    a = channel_ids(["B02", "B03", "B04"], [490.0, 560.0, 665.0])
    b = channel_ids(["ch000", "ch001", "ch002"], [400.0, 560.0, 665.0005])  # generated names: by wavelength
    c = channel_ids(["B04", "X"], [None, None])
    union, ids = union_of([a, b, c])
    assert ids == [(0, 1, 2), (3, 1, 2), (2, 4)]
    assert [u.name for u in union] == ["B02", "B03", "B04", None, "X"]
    with pytest.raises(DataError, match="source 1.*neither names nor wavelengths"):
        union_of([a, channel_ids(["ch000", "ch001"], None)])
    # two channels of one source are never merged
    _, ids = union_of([channel_ids(None, [500.0, 500.0])])
    assert ids == [(0, 1)]


def test_match_to_a_model_reorders_and_names_what_is_missing():
    model = channel_ids(["B02", "B03", "B04"], [490.0, 560.0, 665.0])
    given = list(reversed(channel_ids(["B02", "B03", "B04", "B08"], [490.0, 560.0, 665.0, 842.0])))
    where, how, extra = match_to(model, given)
    assert where == [3, 2, 1] and how == ["name"] * 3 and extra == [0]
    where, how, _ = match_to(model, channel_ids(None, [665.0, 490.0]))
    assert where == [1, None, 0] and how == ["wavelength", "missing", "wavelength"]
    assert ChannelId(None, None).describe() == "an unnamed channel"
