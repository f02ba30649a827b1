"""Data specs: digits, CIFAR-10 and image folders on disk, epoch-seeded sharded loaders."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from egp_fast.cli.data import TensorDataset, hold_out, load_data, parse_data_spec
from egp_fast.cli.loader import make_loader
from egp_fast.errors import ConfigError, DataError


@pytest.mark.parametrize(
    "spec, expected",
    [("digits", ("digits", None)), ("cifar10:/d/c", ("cifar10", "/d/c")),
     ("imagefolder:rel/x", ("imagefolder", "rel/x")), ("ImageNet:/in", ("imagenet", "/in"))],
)
def test_parse_data_spec(spec, expected):
    assert parse_data_spec(spec) == expected


@pytest.mark.parametrize("spec, words", [("mnist", "unknown data kind"), ("cifar10", "needs a path"),
                                         ("digits:/x", "takes no path"), ("", "non-empty")])
def test_parse_data_spec_errors(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_data_spec(spec)


def test_digits_fixed_split_and_shapes():
    torch.manual_seed(1)
    a = load_data("digits")
    torch.manual_seed(2)
    b = load_data("digits")
    assert (len(a.train), len(a.test)) == (1437, 360)
    assert a.train.x.shape == (1437, 1, 16, 16) and a.test.y.dtype == torch.int64
    # The split does not depend on the global seed: same test digits in the same order.
    assert torch.equal(a.test.x, b.test.x) and torch.equal(a.test.y, b.test.y)
    assert set(a.test.y.tolist()) == set(range(10))
    # Standardised with the training statistics.
    assert abs(a.train.x.mean().item()) < 1e-4 and abs(a.train.x.std().item() - 1) < 1e-3
    assert a.describe()["num_classes"] == 10


def test_digits_are_real_digits():
    from sklearn.datasets import load_digits

    def unit(t):  # remove any positive affine map (the standardisation) from each image
        lo = t.amin(dim=(-2, -1), keepdim=True)
        return (t - lo) / (t.amax(dim=(-2, -1), keepdim=True) - lo).clamp_min(1e-9)

    raw = load_digits()
    ref = unit(torch.tensor(raw.data, dtype=torch.float64).reshape(-1, 8, 8))
    src = load_data("digits", image_size=8, limit=20)
    for img, label in zip(unit(src.train.x[:, 0].double()), src.train.y):
        match = (ref - img).abs().amax(dim=(1, 2)) < 1e-5
        assert match.any() and int(label) in set(raw.target[match.numpy()].tolist())


def test_digits_channels_and_limit():
    src = load_data("digits", channels=3, image_size=12, limit=30)
    assert src.train.x.shape == (30, 3, 12, 12) and len(src.test) == 30
    assert torch.equal(src.train.x[:, 0], src.train.x[:, 2])


@pytest.mark.parametrize("kw, words", [({"image_size": 2}, "--image-size"), ({"channels": 2}, "channels"),
                                       ({"limit": 0}, "--limit")])
def test_load_data_bad_options(kw, words):
    with pytest.raises(ConfigError, match=words):
        load_data("digits", **kw)


# ------------------------------------------------------------------ CIFAR-10 on disk
def _write_fake_cifar(root, n=8):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
                         "labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    return folder


def test_cifar10_missing_path_names_layout(tmp_path):
    with pytest.raises(DataError, match="does not exist.*cifar-10-batches-py"):
        load_data(f"cifar10:{tmp_path / 'nope'}")


def test_cifar10_missing_files_listed(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match="lacks data_batch_2.*test_batch.*expected"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar10_corrupt_files_fail_with_layout(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                 "test_batch", "batches.meta"]:
        (folder / name).write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="unreadable or corrupt"):
        load_data(f"cifar10:{tmp_path}")


def test_cifar10_loads_from_disk(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as tvc

    _write_fake_cifar(tmp_path)
    # The fake files cannot match CIFAR-10's md5 sums; everything else is the real code path.
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    src = load_data(f"cifar10:{tmp_path / 'cifar-10-batches-py'}")
    assert (len(src.train), len(src.test), src.num_classes, src.image_size) == (40, 8, 10, 32)
    x, y = next(iter(make_loader(src.test, 4)))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64


# ------------------------------------------------------------------ image folders
def _write_folder(root, classes=("a", "b"), val_classes=None, n=3, size=20):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, cls in (("train", classes), ("val", val_classes or classes)):
        for c in cls:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.parametrize("kind", ["imagefolder", "imagenet"])
def test_imagefolder_loads(tmp_path, kind):
    _write_folder(tmp_path)
    src = load_data(f"{kind}:{tmp_path}", image_size=16)
    assert (len(src.train), len(src.test), src.num_classes) == (6, 6, 2)
    ld = make_loader(src.train, 4, shuffle=True, seed=3, workers=1)
    ld.set_epoch(0)
    batches = list(ld)
    assert len(batches) == len(ld) == 1 and batches[0][0].shape == (4, 3, 16, 16)
    grey = load_data(f"{kind}:{tmp_path}", image_size=16, channels=1)
    assert next(iter(make_loader(grey.test, 6)))[0].shape == (6, 1, 16, 16)


def test_imagefolder_augmentation_is_epoch_seeded(tmp_path):
    _write_folder(tmp_path, n=4)
    src = load_data(f"imagefolder:{tmp_path}", image_size=12)

    def epoch(e):
        ld = make_loader(src.train, 8, shuffle=True, seed=5, workers=1)
        ld.set_epoch(e)
        return torch.cat([x for x, _ in ld])

    assert torch.equal(epoch(1), epoch(1))
    assert not torch.equal(epoch(1), epoch(2))


def _mk_train_only(root):
    (root / "train" / "a").mkdir(parents=True)


def _mk_empty_val(root):
    (root / "train" / "a").mkdir(parents=True)
    (root / "val").mkdir()


@pytest.mark.parametrize("setup, words", [(None, "does not exist"), (_mk_train_only, "val is missing"),
                                          (_mk_empty_val, "has no class folders")])
def test_imagefolder_bad_layout(tmp_path, setup, words):
    root = tmp_path / "data"
    if setup is not None:
        setup(root)
    with pytest.raises(DataError, match=f"{words}.*expected PATH/train/<class>"):
        load_data(f"imagefolder:{root}")


def test_imagefolder_class_mismatch(tmp_path):
    _write_folder(tmp_path, classes=("a", "b"), val_classes=("a", "c"))
    with pytest.raises(DataError, match="class folders differ"):
        load_data(f"imagenet:{tmp_path}")


def test_imagefolder_empty_class_folder(tmp_path):
    _write_folder(tmp_path)
    os.makedirs(tmp_path / "train" / "zzz")
    with pytest.raises(DataError, match="expected PATH/train"):
        load_data(f"imagefolder:{tmp_path}")


# ------------------------------------------------------------------ validation split held out from training
def _rows(x):
    return {tuple(r.tolist()) for r in x.flatten(1)}


def test_hold_out_is_stratified_disjoint_and_seeded():
    src = load_data("digits")
    a = hold_out(src, 0.1, seed=0)
    assert (len(a.train), len(a.val), len(a.test)) == (1294, 143, 360)
    assert a.test is src.test and a.train_eval.x.shape == a.train.x.shape
    # stratified: every class gets round(10%) of its training samples
    per_class = torch.bincount(src.train.y, minlength=10)
    assert torch.equal(torch.bincount(a.val.y, minlength=10), (per_class.double() * 0.1).round().long())
    # disjoint and covering: train + val is the original training split
    tr, va = _rows(a.train.x), _rows(a.val.x)
    assert not tr & va and tr | va == _rows(src.train.x) and not va & _rows(src.test.x)
    # a function of the seed alone
    assert torch.equal(hold_out(src, 0.1, seed=0).val.x, a.val.x)
    assert not torch.equal(hold_out(src, 0.1, seed=1).val.x, a.val.x)
    assert hold_out(src, 0, seed=0) is src and src.val is None
    assert a.describe()["val_size"] == 143


def test_hold_out_of_on_disk_folders(tmp_path):
    _write_folder(tmp_path, n=4)
    src = hold_out(load_data(f"imagefolder:{tmp_path}", image_size=16), 0.25, seed=0)
    assert (len(src.train), len(src.val)) == (6, 2)  # one of each class's 4 images
    labels = [src.val[i][1] for i in range(len(src.val))]
    assert sorted(labels) == [0, 1]
    assert isinstance(src.train, torch.utils.data.Subset) and set(src.train.indices).isdisjoint(src.val.indices)


@pytest.mark.parametrize("fraction, err", [(1.0, ConfigError), (-0.1, ConfigError), (True, ConfigError)])
def test_hold_out_bad_fraction(fraction, err):
    with pytest.raises(err, match="--val-fraction"):
        hold_out(load_data("digits", limit=50), fraction)


def test_hold_out_twice_and_too_little_data():
    once = hold_out(load_data("digits"), 0.1)
    with pytest.raises(ConfigError, match="already has a validation split"):
        hold_out(once, 0.1)
    with pytest.raises(DataError, match="empty split"):
        hold_out(_one_per_class(), 0.1)  # one sample per class: nothing can be held out


def _one_per_class():
    from egp_fast.cli.data import DataSource

    ds = TensorDataset(torch.zeros(3, 1, 8, 8), torch.arange(3))
    return DataSource("digits", "digits", ds, ds, ds, 3, 1, 8)


# -- digits-hard ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hard():
    from egp_fast.cli.digits_hard import digits_hard_splits

    return digits_hard_splits(seed=0, copies=1)


def test_digits_hard_spec_and_shapes():
    assert parse_data_spec("digits-hard") == ("digits-hard", None)
    with pytest.raises(ConfigError, match="takes no path"):
        parse_data_spec("digits-hard:/x")
    src = load_data("digits-hard")
    assert (len(src.train), len(src.test)) == (4 * 1437, 4 * 360)
    assert src.train.x.shape == (4 * 1437, 1, 32, 32) and src.test.x.dtype == torch.float32
    assert src.train.y.dtype == torch.int64 and (src.channels, src.image_size) == (1, 32)
    assert abs(src.train.x.mean().item()) < 1e-4 and abs(src.train.x.std().item() - 1) < 1e-3
    # four images per original, in a row, all with the original's label
    assert torch.equal(src.train.groups[:8], src.train.groups[::4][:2].repeat_interleave(4))
    small = load_data("digits-hard", image_size=16, channels=3, limit=10)
    assert small.train.x.shape == (10, 3, 16, 16) and small.train.groups.shape == (10,)


def test_digits_hard_is_deterministic_by_seed(hard):
    from egp_fast.cli.digits_hard import digits_hard_splits

    torch.manual_seed(123)  # the global generator plays no part
    again = digits_hard_splits(seed=0, copies=1)
    other = digits_hard_splits(seed=1, copies=1)
    for split in ("train", "test"):
        for key in ("x", "y", "origin", "fragment"):
            assert torch.equal(hard[split][key], again[split][key]), (split, key)
        # another seed: other transforms of the same originals
        assert torch.equal(hard[split]["origin"], other[split]["origin"])
        assert (hard[split]["x"] - other[split]["x"]).abs().amax(dim=(1, 2, 3)).min() > 0.1


def test_digits_hard_test_originals_never_reach_training(hard):
    from sklearn.datasets import load_digits

    train, test = hard["train"], hard["test"]
    test_ids = set(test["origin"].tolist())
    assert len(test_ids) == 360 and len(set(train["origin"].tolist())) == 1437
    assert not test_ids & set(train["origin"].tolist())
    # the distractor fragments come from the same split's originals only
    frag_tr = set(train["fragment"][train["fragment"] >= 0].tolist())
    frag_te = set(test["fragment"][test["fragment"] >= 0].tolist())
    assert frag_tr and frag_te and not frag_tr & test_ids and frag_te <= test_ids
    assert (train["fragment"] != train["origin"]).all()
    # labels are the originals' labels
    target = torch.tensor(load_digits().target)
    assert torch.equal(train["y"], target[train["origin"]]) and torch.equal(test["y"], target[test["origin"]])


def test_digits_hard_label_balance(hard):
    for split, n in (("train", 1437), ("test", 360)):
        counts = torch.bincount(hard[split]["y"], minlength=10)
        assert counts.sum() == n and counts.min() >= 0.09 * n and counts.max() <= 0.11 * n, (split, counts)
    assert torch.equal(torch.bincount(hard["test"]["y"]), torch.full((10,), 36))


def test_digits_hard_transforms_move_the_digit():
    from egp_fast.cli.digits_hard import generate

    img = torch.zeros(1, 1, 8, 8)
    img[..., 3:5, 3:5] = 1.0  # a centred blob
    plain = generate(img, torch.zeros(1, dtype=torch.int64), copies=64, seed=0, strength=0.0)["x"]
    assert torch.equal(plain, plain[:1].expand_as(plain))  # strength 0: no randomness at all
    cy, cx = _centroid(plain[0, 0])
    assert abs(cy - 15.5) < 0.5 and abs(cx - 15.5) < 0.5
    moved = generate(img, torch.zeros(1, dtype=torch.int64), copies=64, seed=0)["x"]
    spread = torch.tensor([_centroid(m[0]) for m in (moved > 0.5).float()])
    assert spread.std(dim=0).min() > 3.0  # placed all over the canvas, not just around the centre


def _centroid(img: torch.Tensor) -> tuple[float, float]:
    ys, xs = torch.meshgrid(torch.arange(img.shape[0]), torch.arange(img.shape[1]), indexing="ij")
    w = img.clamp_min(0)
    return float((w * ys).sum() / w.sum()), float((w * xs).sum() / w.sum())


def test_hold_out_keeps_generated_images_of_one_original_together():
    src = hold_out(load_data("digits-hard"), 0.1, seed=3)
    tr, va = set(src.train.groups.tolist()), set(src.val.groups.tolist())
    assert not tr & va and len(va) == pytest.approx(144, abs=5)
    assert len(src.val) == 4 * len(va) >= 400  # one image is at most 0.25 points
    assert set(src.val.y.tolist()) == set(range(10))
    assert torch.equal(src.train_eval.x, src.train.x)
    again = hold_out(load_data("digits-hard"), 0.1, seed=3)
    assert torch.equal(again.val.groups, src.val.groups)
    # plain digits (no groups) split as before: per sample
    plain = hold_out(load_data("digits"), 0.1, seed=0)
    assert (len(plain.train), len(plain.val)) == (1294, 143)
