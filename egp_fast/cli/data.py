"""Data sources for the ``egp-fast`` command. Nothing is ever downloaded.

A data *spec* is one string:

* ``digits`` — scikit-learn's ``load_digits`` (1797 real 8x8 handwritten digits that ship
  with scikit-learn), upsampled bilinearly to ``image_size`` (default 16), standardised with
  the training mean/std, with a fixed 1437/360 train/test split (independent of ``--seed``).
* ``digits-hard`` — the same digits rotated, scaled and moved on a 32x32 canvas with a fragment
  of another digit and pixel noise, 4 images per original; the 360 test originals are held out
  before anything is generated (:mod:`egp_fast.cli.digits_hard`). A logistic regression on the
  pixels is far behind a small CNN there, unlike on ``digits``.
* ``cifar10:PATH`` — torchvision's CIFAR-10 python files already on disk
  (``PATH/cifar-10-batches-py/``), loaded with ``download=False``.
* ``imagefolder:PATH`` — ``PATH/train/<class>/*`` and ``PATH/val/<class>/*`` images.
* ``imagenet:PATH`` — the same layout for ImageNet (val images sorted into class folders),
  with the standard ImageNet transforms at 224 px.

:func:`load_data` returns a :class:`DataSource`; :func:`hold_out` moves a stratified, seeded
fraction of its training split into a validation split (``val``), which is what decisions use
(EASIER's accuracy tolerance, collapse's held-out flip check) so the test split only reports.
:func:`egp_fast.cli.loader.make_loader` builds the epoch-seeded, rank-sharded loaders over the
splits.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from egp_fast.errors import ConfigError, DataError

__all__ = [
    "DataSource",
    "TensorDataset",
    "hold_out",
    "load_data",
    "parse_data_spec",
]

DATA_KINDS = ("digits", "digits-hard", "cifar10", "imagefolder", "imagenet")
EMBEDDED_KINDS = ("digits", "digits-hard")
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
                "test_batch", "batches.meta")


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """Split a data spec into its kind and path.

    Args:
        spec: ``digits``, ``digits-hard``, ``cifar10:PATH``, ``imagefolder:PATH`` or ``imagenet:PATH``.

    Returns:
        ``(kind, path)``; path is ``None`` for ``digits`` and ``digits-hard``.

    Raises:
        ConfigError: unknown kind, a path given to an embedded kind or a missing path.

    Example:
        >>> parse_data_spec("cifar10:/data/cifar")
        ('cifar10', '/data/cifar')
    """
    if not isinstance(spec, str) or not spec:
        raise ConfigError(f"--data must be a non-empty string, got {spec!r}")
    kind, sep, path = spec.partition(":")
    kind = kind.lower()
    if kind not in DATA_KINDS:
        raise ConfigError(
            f"--data {spec}: unknown data kind {kind!r}; use digits, digits-hard, cifar10:PATH, "
            "imagefolder:PATH or imagenet:PATH"
        )
    if kind in EMBEDDED_KINDS:
        if sep:
            raise ConfigError(f"--data {spec}: {kind} is embedded and takes no path; use --data {kind}")
        return kind, None
    if not path:
        raise ConfigError(f"--data {spec}: {kind} needs a path, e.g. --data {kind}:/data/{kind}")
    return kind, path


class TensorDataset:
    """Images and labels held in memory as two tensors (``x[i], y[i]`` per item).

    Args:
        x: float images ``[N, C, H, W]``.
        y: int64 labels ``[N]``.
        groups: optional int64 ``[N]``: samples that share a group (images generated from one
            original) are kept on the same side of :func:`hold_out`'s split.

    Example:
        >>> ds = TensorDataset(torch.zeros(4, 1, 8, 8), torch.arange(4))
        >>> len(ds), ds[1][1].item()
        (4, 1)
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        if x.shape[0] != y.shape[0] or (groups is not None and groups.shape[0] != y.shape[0]):
            raise DataError(f"images, labels and groups differ in length: {x.shape[0]} vs {y.shape[0]}"
                            + ("" if groups is None else f" vs {groups.shape[0]}"))
        self.x = x
        self.y = y
        self.groups = groups

    def subset(self, idx: torch.Tensor) -> TensorDataset:
        """The samples at ``idx`` (images, labels and groups).

        Args:
            idx: int64 indices.

        Returns:
            A new :class:`TensorDataset`.
        """
        return TensorDataset(self.x[idx], self.y[idx], None if self.groups is None else self.groups[idx])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, i):
        return self.x[i], self.y[i]


@dataclass
class DataSource:
    """Datasets of one data spec.

    Attributes:
        spec: the spec string it was loaded from.
        kind: ``digits``, ``digits-hard``, ``cifar10``, ``imagefolder`` or ``imagenet``.
        train: training split with training transforms (augmentation for image data).
        train_eval: the training split with evaluation transforms (used for entropy measurement).
        test: the held-out split with evaluation transforms.
        num_classes: number of labels.
        channels: channels of the images the loaders yield.
        image_size: side of the (square) images the loaders yield.
        val: validation split held out from the training data (evaluation transforms), or
            ``None`` (see :func:`hold_out`).
    """

    spec: str
    kind: str
    train: Any
    train_eval: Any
    test: Any
    num_classes: int
    channels: int
    image_size: int
    val: Any = None

    def describe(self) -> dict:
        """JSON-safe summary: spec, sizes, classes, channels, image size.

        Returns:
            A dict for ``config.json``.

        Example:
            >>> load_data("digits").describe()["train_size"]
            1437
        """
        return {"spec": self.spec, "kind": self.kind, "train_size": len(self.train),
                "val_size": 0 if self.val is None else len(self.val),
                "test_size": len(self.test), "num_classes": self.num_classes,
                "channels": self.channels, "image_size": self.image_size}


def _limit(ds, n: int | None):
    if n is None or n >= len(ds):
        return ds
    if isinstance(ds, TensorDataset):
        return ds.subset(torch.arange(n))
    return torch.utils.data.Subset(ds, range(n))


def load_data(spec: str, *, image_size: int | None = None, channels: int | None = None,
              limit: int | None = None, seed: int = 0) -> DataSource:
    """Load the datasets a spec names; fail fast with the expected layout when the path is wrong.

    Args:
        spec: see :func:`parse_data_spec`.
        image_size: square image side; default 16 (digits), 32 (digits-hard, cifar10), 224 (folders).
        channels: 1 or 3 to force grey/colour images (grey images are repeated to 3);
            default: the data's own channels (1 for digits, 3 otherwise).
        limit: keep at most this many samples of each split (quick runs and tests).
        seed: seed of digits-hard's transforms (the other kinds ignore it); its train/test split
            of the originals is fixed.

    Returns:
        A :class:`DataSource`.

    Raises:
        ConfigError: bad spec, image size, channels or limit.
        DataError: the path is missing or does not have the expected layout.

    Example:
        >>> src = load_data("digits", limit=100)
        >>> len(src.train), src.train[0][0].shape
        (100, torch.Size([1, 16, 16]))
    """
    kind, path = parse_data_spec(spec)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 4):
        raise ConfigError(f"--image-size must be an integer >= 4, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 or 3, got {channels!r}")
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"--limit must be a positive integer, got {limit!r}")
    if kind == "digits":
        src = _load_digits(spec, image_size or 16, channels or 1)
    elif kind == "digits-hard":
        src = _load_digits_hard(spec, image_size or 32, channels or 1, seed)
    elif kind == "cifar10":
        src = _load_cifar10(spec, path, image_size or 32, channels or 3)
    else:
        src = _load_folders(spec, kind, path, image_size or 224, channels or 3)
    src.train = _limit(src.train, limit)
    src.train_eval = _limit(src.train_eval, limit)
    src.test = _limit(src.test, limit)
    return src


def _labels(ds) -> torch.Tensor:
    """Labels of a split without loading its images."""
    if isinstance(ds, TensorDataset):
        return ds.y
    if isinstance(ds, torch.utils.data.Subset):
        return _labels(ds.dataset)[torch.as_tensor(list(ds.indices), dtype=torch.int64)]
    targets = getattr(ds, "targets", None)
    if targets is None:
        raise DataError(f"cannot hold out a stratified validation split from {type(ds).__name__}: it has no "
                        "labels attribute (.targets); pass --val-fraction 0")
    return torch.as_tensor(targets, dtype=torch.int64)


def _subset(ds, idx: torch.Tensor):
    if isinstance(ds, TensorDataset):
        return ds.subset(idx)
    return torch.utils.data.Subset(ds, idx.tolist())


def hold_out(src: DataSource, fraction: float, seed: int = 0) -> DataSource:
    """Move a stratified, seeded ``fraction`` of the training split into a validation split.

    Per class, ``round(fraction * n_class)`` samples (at least one when the class has two or
    more and ``fraction > 0``) are drawn with a generator seeded by ``seed``, so the split is a
    function of the data and the seed alone. When the split has groups (``digits-hard``: the
    images generated from one original), whole groups are drawn instead, so no original has
    images on both sides. ``train`` and ``train_eval`` keep the rest (the
    same samples, training and evaluation transforms); ``val`` gets the held-out samples with
    the evaluation transforms. The test split is untouched.

    Args:
        src: what :func:`load_data` returned (not already split).
        fraction: in ``[0, 1)``; ``0`` returns ``src`` unchanged (``val`` stays ``None``).
        seed: seed of the draw.

    Returns:
        A new :class:`DataSource` with ``val`` set.

    Raises:
        ConfigError: ``fraction`` outside ``[0, 1)``, or ``src`` already has a validation split.
        DataError: the split has no labels, or nothing would be left to train on.

    Example:
        >>> src = hold_out(load_data("digits"), 0.1, seed=0)
        >>> len(src.train), len(src.val), len(src.test)
        (1294, 143, 360)
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"--val-fraction must be a number in [0, 1), got {fraction!r}; e.g. 0.1")
    if src.val is not None:
        raise ConfigError("this DataSource already has a validation split; hold out from load_data()'s result")
    if fraction == 0:
        return src
    labels = _labels(src.train)
    groups = getattr(src.train, "groups", None)
    # Draw groups (or, without groups, single samples: each its own group), stratified by label.
    unit = torch.arange(labels.numel()) if groups is None else groups
    ids, first = torch.unique(unit, return_inverse=True)
    unit_label = torch.empty(ids.numel(), dtype=torch.int64)
    unit_label[first] = labels
    g = torch.Generator().manual_seed(int(seed))
    val_units = []
    for c in torch.unique(unit_label).tolist():
        idx = torch.nonzero(unit_label == c).flatten()
        n = idx.numel()
        k = int(round(fraction * n))
        if n >= 2:
            k = min(max(k, 1), n - 1)
        else:
            k = 0
        val_units.append(idx[torch.randperm(n, generator=g)[:k]])
    in_val = torch.zeros(ids.numel(), dtype=torch.bool)
    in_val[torch.cat(val_units)] = True
    val = torch.nonzero(in_val[first]).flatten()
    keep = ~in_val[first]
    train_idx = torch.nonzero(keep).flatten()
    if val.numel() == 0 or train_idx.numel() == 0:
        raise DataError(f"--val-fraction {fraction} of {labels.numel()} training samples leaves an empty "
                        "split; use more data (--limit) or another fraction")
    return DataSource(src.spec, src.kind, _subset(src.train, train_idx), _subset(src.train_eval, train_idx),
                      src.test, src.num_classes, src.channels, src.image_size, val=_subset(src.train_eval, val))


def _load_digits(spec: str, size: int, channels: int) -> DataSource:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # optional dependency: name the fix
        raise DataError("--data digits needs scikit-learn: pip install scikit-learn") from e
    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    y = torch.tensor(raw.target, dtype=torch.int64)
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    # A fixed split (its own generator, not --seed) so every run evaluates on the same 360 digits.
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(20230817))
    n_test = 360
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    xtr, xte = x[train_idx], x[test_idx]
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if channels == 3:
        xtr, xte = xtr.repeat(1, 3, 1, 1), xte.repeat(1, 3, 1, 1)
    train = TensorDataset(xtr.contiguous(), y[train_idx].contiguous())
    test = TensorDataset(xte.contiguous(), y[test_idx].contiguous())
    return DataSource(spec, "digits", train, train, test, 10, channels, size)


def _load_digits_hard(spec: str, size: int, channels: int, seed: int) -> DataSource:
    from egp_fast.cli.digits_hard import digits_hard_splits

    splits = digits_hard_splits(seed=seed)
    xtr, xte = splits["train"]["x"], splits["test"]["x"]
    if size != xtr.shape[-1]:
        xtr = F.interpolate(xtr, size=(size, size), mode="bilinear", align_corners=False)
        xte = F.interpolate(xte, size=(size, size), mode="bilinear", align_corners=False)
    mean, std = xtr.mean(), xtr.std()
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    if channels == 3:
        xtr, xte = xtr.repeat(1, 3, 1, 1), xte.repeat(1, 3, 1, 1)
    train = TensorDataset(xtr.contiguous(), splits["train"]["y"], splits["train"]["origin"])
    test = TensorDataset(xte.contiguous(), splits["test"]["y"], splits["test"]["origin"])
    return DataSource(spec, "digits-hard", train, train, test, 10, channels, size)


def _grey_to(channels: int):
    from torchvision import transforms as T

    return [T.Grayscale(num_output_channels=channels)] if channels == 1 else [T.Lambda(_to_rgb)]


def _to_rgb(img):
    return img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img


def _load_cifar10(spec: str, path: str, size: int, channels: int) -> DataSource:
    layout = ("expected torchvision's CIFAR-10 python files: PATH/cifar-10-batches-py/"
              "{data_batch_1..5, test_batch, batches.meta} (nothing is downloaded)")
    root = os.path.abspath(os.path.expanduser(path))
    if os.path.basename(root.rstrip(os.sep)) == "cifar-10-batches-py":
        root = os.path.dirname(root.rstrip(os.sep))
    if not os.path.isdir(root):
        raise DataError(f"--data {spec}: directory {root} does not exist; {layout}")
    folder = os.path.join(root, "cifar-10-batches-py")
    missing = [f for f in _CIFAR_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise DataError(f"--data {spec}: {folder} lacks {', '.join(missing)}; {layout}")
    try:
        from torchvision import datasets
        from torchvision import transforms as T
    except ImportError as e:
        raise DataError("--data cifar10 needs torchvision: pip install torchvision") from e
    norm = T.Normalize(_CIFAR_MEAN, _CIFAR_STD) if channels == 3 else T.Normalize((0.4809,), (0.2392,))
    resize = [T.Resize(size)] if size != 32 else []
    grey = [T.Grayscale(1)] if channels == 1 else []
    train_tf = T.Compose(resize + [T.RandomCrop(size, padding=size // 8), T.RandomHorizontalFlip()]
                         + grey + [T.ToTensor(), norm])
    eval_tf = T.Compose(resize + grey + [T.ToTensor(), norm])
    try:
        train = datasets.CIFAR10(root, train=True, transform=train_tf, download=False)
        train_eval = datasets.CIFAR10(root, train=True, transform=eval_tf, download=False)
        test = datasets.CIFAR10(root, train=False, transform=eval_tf, download=False)
    except Exception as e:  # torchvision raises RuntimeError/pickle errors on corrupt files
        raise DataError(f"--data {spec}: CIFAR-10 files in {folder} are unreadable or corrupt ({e}); "
                        f"{layout}") from e
    return DataSource(spec, "cifar10", train, train_eval, test, 10, channels, size)


def _load_folders(spec: str, kind: str, path: str, size: int, channels: int) -> DataSource:
    layout = ("expected PATH/train/<class>/<image> and PATH/val/<class>/<image> with the same class "
              "folders in both (ImageNet: val images sorted into class folders)")
    root = os.path.abspath(os.path.expanduser(path))
    if not os.path.isdir(root):
        raise DataError(f"--data {spec}: directory {root} does not exist; {layout}")
    for split in ("train", "val"):
        d = os.path.join(root, split)
        if not os.path.isdir(d):
            raise DataError(f"--data {spec}: {d} is missing; {layout}")
        if not any(e.is_dir() for e in os.scandir(d)):
            raise DataError(f"--data {spec}: {d} has no class folders; {layout}")
    try:
        from torchvision import datasets
        from torchvision import transforms as T
    except ImportError as e:
        raise DataError(f"--data {kind} needs torchvision: pip install torchvision") from e
    mean, std = (_IMAGENET_MEAN, _IMAGENET_STD) if channels == 3 else ((0.449,), (0.226,))
    colour = _grey_to(channels)
    train_tf = T.Compose(colour + [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                                   T.Normalize(mean, std)])
    eval_tf = T.Compose(colour + [T.Resize(int(math.ceil(size / 0.875))), T.CenterCrop(size),
                                  T.ToTensor(), T.Normalize(mean, std)])
    try:
        train = datasets.ImageFolder(os.path.join(root, "train"), transform=train_tf)
        train_eval = datasets.ImageFolder(os.path.join(root, "train"), transform=eval_tf)
        test = datasets.ImageFolder(os.path.join(root, "val"), transform=eval_tf)
    except (FileNotFoundError, OSError) as e:
        raise DataError(f"--data {spec}: {e}; {layout}") from e
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))[:3]
        only_val = sorted(set(test.classes) - set(train.classes))[:3]
        raise DataError(f"--data {spec}: train/ and val/ class folders differ (train only: {only_train}, "
                        f"val only: {only_val}); {layout}")
    return DataSource(spec, kind, train, train_eval, test, len(train.classes), channels, size)
