"""tools/predict.py --task mae: the training's mask ratio by default, complementary masks that
predict every patch while hidden, and one contrast stretch for training's and predict's pictures.
A stand-in model that marks which patches it was shown hidden makes each rule visible."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dchag.inference.pretrained import PretrainedDChag
from dchag.model.config import DChagConfig
from dchag.tasks.mae import complementary_masks, patch_mask


class MarksHidden(torch.nn.Module):
    """Outputs +1 on the pixels of hidden patches and -1 elsewhere; records each mask."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg, self.masks = cfg, []

    def forward(self, images, patch_mask=None):
        B, C, H, W = images.shape
        p, (gh, gw) = self.cfg.patch_dim, self.cfg.grid
        m = torch.zeros(B, gh * gw, dtype=torch.bool) if patch_mask is None else patch_mask.cpu()
        self.masks.append(m.clone())
        px = m.reshape(B, gh, gw).repeat_interleave(p, 1).repeat_interleave(p, 2)[:, None].expand(B, C, H, W)
        return px.float() * 2 - 1


def _model(mask_ratio):
    cfg = DChagConfig(num_channels=3, img_h=8, img_w=12, patch_dim=2, groups=1)  # 4 x 6 = 24 patches
    return PretrainedDChag(MarksHidden(cfg), {"mask_ratio": mask_ratio}, torch.device("cpu"))


@pytest.mark.parametrize("L", [16, 24, 25])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75, 0.9])
def test_complementary_masks_cover_every_patch_at_the_training_ratio(L, ratio):
    index = torch.arange(5) * 7
    m = complementary_masks(index, L, ratio, seed=3)
    n = int(round(ratio * L))
    assert m.shape == (math.ceil(L / n), 5, L)
    assert (m.sum(-1) == n).all()  # each pass hides what training hid
    assert m.any(0).all()  # together they hide every patch
    assert m[:-1].sum(0).max() == 1  # the passes before the last are disjoint
    assert torch.equal(m[0], patch_mask(index, L, ratio, 3, 0))  # pass 0 is the one random mask


def test_reconstruct_defaults_to_the_training_ratio_and_complementary_predicts_every_patch_hidden():
    model = _model(0.75)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 12)).astype(np.float32)
    x[1, 0, 0, 0] = np.nan
    out = model.reconstruct(x)  # default: the training run's 0.75 -> 18 of 24 patches
    assert [int(m.sum()) for m in model.model.masks[-1]] == [18, 18]
    assert np.mean(out[np.isfinite(out)] == 1.0) == pytest.approx(0.75, abs=0.02)
    model.model.masks.clear()
    out = model.reconstruct(x, complementary=True, sample_index=[4, 9])
    assert len(model.model.masks) == 2 and all(int(r.sum()) == 18 for m in model.model.masks for r in m)
    assert np.isnan(out[1, 0, 0, 0]) and (out[np.isfinite(out)] == 1.0).all()  # every pixel from a hidden pass


def test_predict_file_uses_the_training_ratio_by_default(tmp_path):
    from dchag.inference.predict import predict_file
    path = tmp_path / "cube.npy"
    np.save(path, np.random.default_rng(1).normal(size=(1, 3, 8, 12)).astype(np.float32))
    model = _model(0.5)
    predict_file(model, str(path), "mae", str(tmp_path / "out.npy"), progress=False)
    assert [int(r.sum()) for r in model.model.masks[-1]] == [12]


def test_training_and_predict_pictures_share_one_stretch():
    """Training renders normalized tiles with band_limits of range(3); predict renders data units
    with the saved statistics. The same pixel gets the same colour: clip((z + 2) / 4, 0, 1)."""
    from dchag.data.visualize import band_limits, rgb_renderer
    rng = np.random.default_rng(2)
    z = rng.normal(size=(5, 4, 6))  # normalized values of 5 bands
    mean, std = rng.uniform(100, 200, 5), rng.uniform(1, 30, 5)
    data = mean[:, None, None] + std[:, None, None] * z
    ch = [4, 2, 0]
    training = rgb_renderer(None, [0, 1, 2], band_limits(range(3)))(z[ch])
    predict = rgb_renderer(data, ch, band_limits(ch, mean, std))(data)
    want = np.clip((z[ch] + 2.0) / 4.0, 0, 1).transpose(1, 2, 0)
    np.testing.assert_allclose(training, want, atol=1e-12)
    np.testing.assert_allclose(predict, want, atol=1e-9)


def test_predict_refuses_a_cube_stored_channels_last(tmp_path):
    from dchag.data import DataError
    from dchag.inference.predict import predict_file
    path = tmp_path / "hwc.npy"
    np.save(path, np.zeros((1, 8, 12, 3), np.float32))  # [N, H, W, C] with the model's C = 3
    with pytest.raises(DataError, match=r"the model's 3 channels.*channels-last.*transpose\(0, 3, 1, 2\)"):
        predict_file(_model(0.5), str(path), "mae", str(tmp_path / "out.npy"), progress=False)
    assert not (tmp_path / "out.npy").exists()
    # declared (--channels-last): predicted as its channels-first twin is
    x = np.random.default_rng(0).normal(size=(1, 8, 12, 3)).astype(np.float32)
    np.save(path, x)
    np.save(tmp_path / "chw.npy", np.moveaxis(x, -1, 1))
    last = predict_file(_model(0.5), str(path), "mae", str(tmp_path / "last.npy"), progress=False, channels_last=True)
    first = predict_file(_model(0.5), str(tmp_path / "chw.npy"), "mae", str(tmp_path / "first.npy"), progress=False)
    np.testing.assert_array_equal(np.asarray(last), np.asarray(first))
