"""Tests of timm_dec.data: random knots, RandomMonotoneScale, LocallyScaledDigits, rescale_object."""
import pickle
import random
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from timm_dec.data import LocallyScaledDigits, RandomMonotoneScale, random_knots, rescale_object
from timm_dec.ops import apply_inverse_map, check_knots, identity_knots, pixel_coords


def _rng_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def _assert_rng_unchanged(before):
    after = _rng_states()
    assert torch.equal(before[0], after[0])
    assert np.array_equal(before[1], after[1])
    assert before[2] == after[2]


def _ramp_image(height: int, width: int) -> torch.Tensor:
    """(2, H, W): channel 0 is the normalised x of each pixel, channel 1 its y."""
    return pixel_coords(height, width, dtype=torch.float64).reshape(height, width, 2).permute(2, 0, 1).clone()


class TestRandomKnots:
    def test_valid_deterministic_and_seed_dependent(self):
        before = _rng_states()
        a = random_knots(3, grid=4, strength=0.5, generator=torch.Generator().manual_seed(1))
        b = random_knots(3, grid=4, strength=0.5, generator=torch.Generator().manual_seed(1))
        c = random_knots(3, grid=4, strength=0.5, generator=torch.Generator().manual_seed(2))
        _assert_rng_unchanged(before)
        assert a.shape == (3, 2, 5, 5) and check_knots(a) == 4
        assert torch.equal(a, b) and not torch.allclose(a, c)
        assert not torch.allclose(a[0], a[1])  # each warp of a batch is its own draw

    def test_strength_zero_is_identity(self):
        k = random_knots(2, grid=3, strength=0.0, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        assert torch.equal(k, identity_knots(2, 3, dtype=torch.float64))

    @pytest.mark.parametrize("kwargs, err", [
        (dict(batch=2, grid=0), ValueError), (dict(batch=-1), ValueError), (dict(batch=2, strength=-0.1), ValueError),
        (dict(batch=2, strength=float("nan")), ValueError), (dict(batch=2.0), TypeError),
        (dict(batch=2, dtype=torch.int64), TypeError),
    ])
    def test_bad_input(self, kwargs, err):
        with pytest.raises(err):
            random_knots(**kwargs)


class TestRandomMonotoneScale:
    def test_identity_at_strength_zero_and_p_zero(self):
        x = torch.rand(3, 8, 8)
        pil = Image.fromarray((np.arange(64, dtype=np.uint8).reshape(8, 8)))
        for aug in (RandomMonotoneScale(strength=0.0, p=1.0, seed=0), RandomMonotoneScale(strength=0.5, p=0.0)):
            assert aug(x) is x
            assert aug(pil) is pil

    def test_applies_the_action_s(self):
        # A coordinate ramp warped by S must hold l^{-1}(p) at every pixel p (bilinear sampling of a linear ramp is
        # exact), with the warp the augmentation drew: a coin, then the knots, from the same generator.
        aug = RandomMonotoneScale(strength=0.5, grid=4, p=1.0, generator=torch.Generator().manual_seed(5))
        out = aug(_ramp_image(9, 11))
        g = torch.Generator().manual_seed(5)
        torch.rand(1, generator=g)
        knots = random_knots(1, 4, 0.5, generator=g, dtype=torch.float64)
        expected = apply_inverse_map(knots, pixel_coords(9, 11, dtype=torch.float64)[None]).reshape(9, 11, 2)
        assert out.dtype == torch.float64
        torch.testing.assert_close(out.permute(1, 2, 0), expected, atol=1e-5, rtol=0)
        assert (out - _ramp_image(9, 11)).abs().max() > 0.02

    def test_seed_determinism_and_global_rng(self):
        x = torch.rand(2, 3, 16, 16)
        before = _rng_states()
        a = RandomMonotoneScale(strength=0.5, p=1.0, seed=3)(x)
        b = RandomMonotoneScale(strength=0.5, p=1.0, seed=3)(x)
        c = RandomMonotoneScale(strength=0.5, p=1.0, seed=4)(x)
        _assert_rng_unchanged(before)
        assert torch.equal(a, b) and not torch.allclose(a, c)
        assert not torch.allclose(a[0], a[1], atol=1e-3)  # each image its own warp

    def test_per_image_coin(self):
        x = torch.rand(40, 1, 8, 8)
        out = RandomMonotoneScale(strength=0.5, p=0.5, seed=0)(x)
        same = (out == x).flatten(1).all(1)
        assert out.shape == x.shape
        assert 0 < int(same.sum()) < 40  # untouched images are returned bit for bit, the others are warped

    def test_uint8_tensor_and_pil_agree(self):
        arr = np.random.default_rng(0).integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
        pil_out = RandomMonotoneScale(strength=0.5, p=1.0, seed=1)(Image.fromarray(arr))
        ten_out = RandomMonotoneScale(strength=0.5, p=1.0, seed=1)(torch.from_numpy(arr).permute(2, 0, 1))
        assert pil_out.mode == "RGB" and pil_out.size == (10, 12)
        assert ten_out.dtype == torch.uint8 and ten_out.shape == (3, 12, 10)
        assert np.array_equal(np.asarray(pil_out), ten_out.permute(1, 2, 0).numpy())
        assert not np.array_equal(np.asarray(pil_out), arr)

    @pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "I", "I;16", "F"])
    def test_pil_modes_round_trip(self, mode):
        img = Image.fromarray(np.full((6, 7), 200, dtype=np.uint8)).convert(mode)
        out = RandomMonotoneScale(strength=0.5, p=1.0, seed=0)(img)
        assert out.mode == mode and out.size == img.size
        # a constant image stays constant under any warp (float mode F: up to the float32 rounding of the weights)
        np.testing.assert_allclose(np.asarray(out), np.asarray(img), rtol=1e-6, atol=0 if mode != "F" else 1e-4)

    def test_inside_torchvision_compose(self):
        pil = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(16, 16, 3), dtype=np.uint8))
        on_pil = transforms.Compose([RandomMonotoneScale(strength=0.4, p=1.0, seed=0), transforms.ToTensor()])(pil)
        on_tensor = transforms.Compose([
            transforms.ToTensor(), RandomMonotoneScale(strength=0.4, p=1.0, seed=0),
            transforms.Normalize([0.5] * 3, [0.5] * 3)])(pil)
        assert on_pil.shape == on_tensor.shape == (3, 16, 16)
        torch.testing.assert_close(on_tensor * 0.5 + 0.5, on_pil, atol=1 / 255 + 1e-6, rtol=0)
        assert "RandomMonotoneScale(strength=0.4, grid=4, p=1.0, seed=0)" in repr(
            transforms.Compose([RandomMonotoneScale(strength=0.4, p=1.0, seed=0)]))

    def test_pickle_and_dataloader_workers_differ(self):
        aug = pickle.loads(pickle.dumps(RandomMonotoneScale(strength=0.5, p=1.0, seed=7)))
        x = torch.rand(1, 8, 8)
        assert torch.equal(aug(x), RandomMonotoneScale(strength=0.5, p=1.0, seed=7)(x))

        class Same(Dataset):
            def __len__(self):
                return 2

            def __getitem__(self, i):
                return aug(_ramp_image(8, 8).float())

        torch.manual_seed(0)
        a, b = list(DataLoader(Same(), batch_size=1, num_workers=2))
        assert not torch.allclose(a, b)  # each worker reseeds its own copy of the generator

    @pytest.mark.parametrize("kwargs, err", [
        (dict(p=1.5), ValueError), (dict(p=-0.1), ValueError), (dict(strength=-1.0), ValueError),
        (dict(grid=0), ValueError), (dict(seed=1, generator=torch.Generator()), ValueError),
        (dict(generator=3), TypeError),
    ])
    def test_bad_options(self, kwargs, err):
        with pytest.raises(err):
            RandomMonotoneScale(**kwargs)

    def test_bad_images(self):
        aug = RandomMonotoneScale(p=1.0, seed=0)
        with pytest.raises(ValueError, match="shape"):
            aug(torch.rand(8, 8))
        with pytest.raises(TypeError, match="uint8"):
            aug(torch.zeros(1, 8, 8, dtype=torch.int32))
        with pytest.raises(ValueError, match="mode"):
            aug(Image.new("P", (8, 8)))
        with pytest.raises(TypeError):
            aug(np.zeros((3, 8, 8)))


def _digits(**kwargs) -> LocallyScaledDigits:
    opts = dict(split="test", num_samples=6, canvas=48)
    opts.update(kwargs)
    return LocallyScaledDigits(**opts)


class TestLocallyScaledDigits:
    def test_items(self):
        ds = _digits()
        image, label = ds[0]
        assert len(ds) == 6 and ds.num_classes == 1000 and ds.digit_size == 6
        assert image.shape == (3, 48, 48) and image.dtype == torch.float32
        assert 0 <= float(image.min()) and float(image.max()) <= 1 and float(image.max()) > 0.5
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        assert torch.equal(_digits(channels=1)[0][0], image[:1])
        assert isinstance(label, int) and 0 <= label < 1000
        assert torch.equal(ds[-1][0], ds[5][0])
        images, labels = next(iter(DataLoader(ds, batch_size=3)))
        assert images.shape == (3, 3, 48, 48) and labels.tolist() == [ds[i][1] for i in range(3)]

    def test_deterministic_seeded_and_rng_free(self):
        before = _rng_states()
        a, b, c = _digits(seed=1), _digits(seed=1), _digits(seed=2)
        items_a = [a[i] for i in range(6)]
        _assert_rng_unchanged(before)
        for i, (image, label) in enumerate(items_a):
            assert torch.equal(image, b[i][0]) and label == b[i][1]
        assert [x[1] for x in items_a] != [c[i][1] for i in range(6)]
        assert [a[i][1] for i in range(6)] != [_digits(split="train", seed=1)[i][1] for i in range(6)]

    def test_source_pools_match_sklearn_and_are_disjoint(self):
        from sklearn.datasets import load_digits
        bunch = load_digits()
        train, test = _digits(split="train"), _digits(split="test")
        train_ids, test_ids = set(train.source_ids.tolist()), set(test.source_ids.tolist())
        assert not train_ids & test_ids and len(train_ids | test_ids) == len(bunch.target)
        assert 0.15 < len(test_ids) / len(bunch.target) < 0.25
        for ds in (train, test):
            ids = ds.source_ids.numpy()
            assert np.array_equal(ds.source_labels.numpy(), bunch.target[ids])
            assert np.allclose(ds.source_images.numpy(), bunch.images[ids] / 16.0)
            assert set(ds.source_labels.tolist()) == set(range(10))
        for i in range(6):  # items use only their split's pool
            assert {int(test.source_ids[j]) for j in test.describe(i).source_indices} <= test_ids

    def test_label_is_the_number_of_the_source_digits(self):
        ds = _digits(num_samples=20, num_digits=2)
        assert ds.num_classes == 100
        for i in range(20):
            s = ds.describe(i)
            digits = [int(ds.source_labels[j]) for j in s.source_indices]
            assert ds[i][1] == s.label == int("".join(map(str, digits))) == 10 * digits[0] + digits[1]
            assert all(0.4 <= v <= 2.0 for v in s.scales)

    def test_layout_at_scale_one_is_the_raw_source_digits(self):
        # With digit_size = the sources' own 8 px, scale 1 pastes each source image unchanged into its box:
        # 3 boxes of 8 px on a 40 px canvas leave (40 - 24) / 4 = 4 px gaps: lefts 4, 16, 28 and tops (40 - 8) // 2.
        ds = _digits(canvas=40, digit_size=8, scale_range=(0.5, 1.5))
        assert ds.digit_boxes((1.0, 1.0, 1.0)) == [(4, 16, 8), (16, 16, 8), (28, 16, 8)]
        images, label = ds.variants(2, [1.0])
        expected = torch.zeros(40, 40)
        for (left, top, size), j in zip(ds.digit_boxes((1.0,) * 3), ds.describe(2).source_indices):
            expected[top:top + size, left:left + size] = ds.source_images[j]
        assert torch.equal(images[0, 0], expected) and label == ds[2][1]

    def test_variants(self):
        ds = _digits(canvas=64)
        sample = ds.describe(1)
        images, label = ds.variants(1, [sample.scales, 0.5, 1.0, 2.0, (0.5, 1.0, 2.0)])
        assert images.shape == (5, 3, 64, 64) and label == sample.label
        assert torch.equal(images[0], ds[1][0])  # the item's own scales reproduce the item
        assert ds.describe(1) == sample
        ink = images[1:4, 0].sum((1, 2))
        assert 3.0 < float(ink[1] / ink[0]) < 5.0 and 3.0 < float(ink[2] / ink[1]) < 5.0  # ink grows as scale^2
        boxes = ds.digit_boxes((0.5, 1.0, 2.0))
        assert [b[2] for b in boxes] == [4, 8, 16]
        outside = images[4, 0].clone()
        for left, top, size in boxes:
            outside[top:top + size, left:left + size] = 0
        assert float(outside.abs().max()) == 0  # nothing drawn outside the digit boxes

    def test_transform(self):
        ds = _digits(transform=transforms.Normalize([0.5] * 3, [0.5] * 3))
        raw = _digits()
        torch.testing.assert_close(ds[0][0], raw[0][0] * 2 - 1)
        torch.testing.assert_close(ds.variants(0, [1.0])[0], raw.variants(0, [1.0])[0] * 2 - 1)

    def test_fit_errors(self):
        with pytest.raises(ValueError, match="canvas"):
            _digits(canvas=40, digit_size=8, scale_range=(0.4, 2.0))  # 3 x 16 px > 40 px
        with pytest.raises(ValueError, match="smaller than one pixel"):
            _digits(canvas=16, scale_range=(0.1, 1.0))
        with pytest.raises(ValueError, match="canvas"):
            _digits().variants(0, [3.0])

    @pytest.mark.parametrize("kwargs, err", [
        (dict(split="val"), ValueError), (dict(source="emnist"), ValueError), (dict(channels=2), ValueError),
        (dict(scale_range=(2.0, 1.0)), ValueError), (dict(scale_range=(0.0, 1.0)), ValueError),
        (dict(scale_range=1.0), ValueError), (dict(num_digits=0), ValueError), (dict(num_samples=-1), ValueError),
        (dict(source="mnist"), ValueError), (dict(canvas=48.0), TypeError),
    ])
    def test_bad_options(self, kwargs, err):
        with pytest.raises(err):
            _digits(**kwargs)

    def test_bad_indices_and_scales(self):
        ds = _digits()
        with pytest.raises(IndexError):
            ds[6]
        with pytest.raises(ValueError, match="non-empty"):
            ds.variants(0, [])
        with pytest.raises(ValueError, match="3 entries"):
            ds.variants(0, [(1.0, 1.0)])
        with pytest.raises(ValueError, match="scale"):
            ds.variants(0, [-1.0])

    def test_mnist_missing_root(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="MNIST not found"):
            _digits(source="mnist", root=tmp_path)

    def test_mnist_from_a_local_torchvision_root(self, tmp_path):
        raw = tmp_path / "MNIST" / "raw"
        raw.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for prefix, n in (("train", 20), ("t10k", 10)):
            images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
            labels = (np.arange(n) % 10).astype(np.uint8)
            (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
            (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())
            if prefix == "t10k":
                test_images, test_labels = images, labels
        ds = _digits(source="mnist", root=tmp_path, canvas=112)
        assert ds.digit_size == 14 and len(ds.source_images) == 10
        assert torch.equal(ds.source_images, torch.from_numpy(test_images).float() / 255)
        assert ds.source_ids.tolist() == list(range(60000, 60010))
        assert _digits(split="train", source="mnist", root=tmp_path).source_ids.tolist() == list(range(20))
        s = ds.describe(0)
        assert s.label == int("".join(str(int(test_labels[j])) for j in s.source_indices))
        assert ds[0][0].shape == (3, 112, 112)


class TestRescaleObject:
    def test_factor_one_pastes_the_object(self):
        image, background = torch.rand(3, 10, 12), torch.rand(3, 10, 12)
        mask = torch.zeros(10, 12, dtype=torch.bool)
        mask[2:6, 3:9] = True
        out = rescale_object(image, mask, background, 1.0, feather=0.0)
        assert torch.equal(out, torch.where(mask, image, background))
        torch.testing.assert_close(rescale_object(image, mask, image, 1.0, feather=2.0), image)

    def test_enlarge_by_hand(self):
        # A 3x3 object centred at (4, 4), x2 about its centre: output p samples 4 + (p - 4) / 2, so each axis gets
        # alpha [0, .5, 1, 1, 1, 1, 1, .5, 0]; with a white object on black the output is alpha.
        mask = torch.zeros(9, 9)
        mask[3:6, 3:6] = 1
        out = rescale_object(torch.ones(1, 9, 9), mask, torch.zeros(1, 9, 9), 2.0, feather=0.0)
        a = torch.tensor([0, 0.5, 1, 1, 1, 1, 1, 0.5, 0])
        torch.testing.assert_close(out[0], torch.outer(a, a))

    def test_shrink_about_bbox_centre_by_hand(self):
        # A 5x5 object at rows/cols 2..6 (bbox centre 4), x0.5: p samples 4 + 2 (p - 4) -> inside for p in 3..5.
        mask = torch.zeros(9, 9, dtype=torch.bool)
        mask[2:7, 2:7] = True
        image = torch.full((2, 9, 9), 0.25)
        out = rescale_object(image, mask, torch.ones(2, 9, 9), 0.5, feather=0.0, center="bbox")
        inside = torch.zeros(9, 9, dtype=torch.bool)
        inside[3:6, 3:6] = True
        torch.testing.assert_close(out, torch.where(inside, 0.25, 1.0).expand(2, 9, 9))

    @pytest.mark.parametrize("center", ["centroid", "bbox"])
    def test_centre_stays_fixed(self, center):
        mask = torch.zeros(21, 21)
        mask[8:12, 4:7] = 1
        mask[9:11, 7:16] = 1  # an asymmetric object: centroid and bbox centre differ
        ys, xs = torch.meshgrid(torch.arange(21.0), torch.arange(21.0), indexing="ij")

        def centre(m):
            if center == "centroid":
                return torch.stack(((m * ys).sum() / m.sum(), (m * xs).sum() / m.sum()))
            rows, cols = m.gt(0).any(1).nonzero(), m.gt(0).any(0).nonzero()
            return torch.stack(((rows.min() + rows.max()) / 2.0, (cols.min() + cols.max()) / 2.0))

        out = rescale_object(torch.ones(1, 21, 21), mask, torch.zeros(1, 21, 21), 1.5, feather=0.0, center=center)
        moved = out[0] if center == "centroid" else out[0].gt(0.5).float()
        torch.testing.assert_close(centre(moved), centre(mask), atol=0.1, rtol=0)
        assert float(out[0].sum()) > 1.8 * float(mask.sum())  # area grows by about 1.5^2

    def test_feather_is_a_gaussian_blur_of_the_mask(self):
        mask = torch.zeros(25, 25)
        mask[10:15, 9:16] = 1
        out = rescale_object(torch.ones(1, 25, 25), mask, torch.zeros(1, 25, 25), 1.0, feather=1.5)
        t = np.arange(-5, 6)
        k = np.exp(-0.5 * (t[:, None] ** 2 + t[None, :] ** 2) / 1.5 ** 2)
        k /= k.sum()
        ref = F.conv2d(mask[None, None].double(), torch.from_numpy(k)[None, None], padding=5)[0, 0]
        torch.testing.assert_close(out[0].double(), ref, atol=1e-6, rtol=0)

    def test_bad_input(self):
        image, bg = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
        mask = torch.zeros(8, 8, dtype=torch.bool)
        mask[2:4, 2:4] = True
        cases = [
            (dict(mask=torch.ones(8, 7, dtype=torch.bool)), ValueError, "mask shape"),
            (dict(background=torch.rand(3, 8, 9)), ValueError, "background shape"),
            (dict(factor=0.0), ValueError, "factor"), (dict(factor=-2.0), ValueError, "factor"),
            (dict(factor=float("inf")), ValueError, "factor"),
            (dict(mask=torch.zeros(8, 8, dtype=torch.bool)), ValueError, "empty"),
            (dict(mask=mask.float() * 2), ValueError, r"\[0, 1\]"),
            (dict(mask=mask.to(torch.uint8)), TypeError, "bool or float"),
            (dict(center="middle"), ValueError, "center"), (dict(feather=-1.0), ValueError, "feather"),
            (dict(image=torch.rand(8, 8)), ValueError, "image"),
        ]
        for change, err, match in cases:
            args = dict(image=image, mask=mask, background=bg, factor=1.2)
            args.update(change)
            with pytest.raises(err, match=match):
                rescale_object(**args)
