"""``digits-hard``: scikit-learn's digits made hard enough that a linear classifier falls behind.

On plain ``digits`` (8x8 digits, centred, upsampled) a logistic regression on the pixels is
within about a point of a ResNet, so "accuracy kept while removing nonlinear layers" says little
there. ``digits-hard`` keeps the same 1797 real handwritten digits and generates a harder task
from them, with nothing downloaded:

1. The originals are split first, with a fixed generator: 360 *test origins* (36 of each digit)
   and 1437 *training origins* (a validation split is later drawn from the training origins by
   :func:`egp_fast.cli.data.hold_out`, whole origins at a time). Every generated image of a split
   is made from that split's originals only, distractor fragments included, so no test
   original is ever seen in training.
2. Each original yields ``copies`` images on a ``canvas x canvas`` canvas (default 4 on 32x32):
   the digit is rotated (up to +-25 degrees), scaled (11 to 18 pixels tall) and placed anywhere
   it fits; a *fragment* of another digit of the same split (a random half of it, cut along a
   random line) is added with probability 0.85 at a random place, at 50-100% intensity; then
   Gaussian pixel noise (sigma 0.15) is added and the image is clipped to ``[0, 1]``.
3. The generator is seeded (``seed``, default 0): the same seed gives bit-identical images.

Everything is one batched :func:`torch.nn.functional.grid_sample` per layer of the image, so
the whole set (7188 images) takes about a second on one CPU core.

``strength`` scales rotation, the placement range, the fragment probability and the noise
together (0: plain centred digits on the canvas; 1: the defaults above). At strength 1 a
logistic regression on the pixels is at chance, while a ResNet-18 of width 16 learns the task
(figures in ``benchmarks/results/fidelity_hard.md``); on plain ``digits`` the same logistic
regression is within a few points of the ResNet.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["DIGITS_HARD_DEFAULTS", "digits_hard_splits", "generate"]

#: The generator's settings at ``strength=1`` (documented in the module docstring).
DIGITS_HARD_DEFAULTS = {
    "canvas": 32, "copies": 4, "n_test_origins": 360, "rotation_deg": 25.0, "height_px": (11.0, 18.0),
    "fragment_p": 0.85, "fragment_intensity": (0.5, 1.0), "noise": 0.15,
}
# The origin split is fixed (its own generator, independent of ``seed``), as plain digits' is.
_SPLIT_SEED = 20261205


def _originals() -> tuple[torch.Tensor, torch.Tensor]:
    from egp_fast.errors import DataError

    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # optional dependency: name the fix
        raise DataError("--data digits-hard needs scikit-learn: pip install scikit-learn") from e
    raw = load_digits()
    x = torch.tensor(raw.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(raw.target, dtype=torch.int64)


def _place(img: torch.Tensor, angle: torch.Tensor, height: torch.Tensor, centre: torch.Tensor,
           canvas: int) -> torch.Tensor:
    """Draw each 8x8 ``img`` rotated by ``angle`` (radians), ``height`` pixels tall, centred at
    ``centre`` (normalised canvas coordinates in [-1, 1]) on a ``canvas``-sided image."""
    n = img.shape[0]
    # affine_grid maps output (canvas) coordinates to input (digit) coordinates: the inverse of
    # "scale the digit's [-1, 1] square to height/canvas of the canvas, rotate, move to centre".
    inv_scale = canvas / height
    cos, sin = torch.cos(angle), torch.sin(angle)
    m = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2) * inv_scale[:, None, None]
    theta = torch.cat([m, -(m @ centre[:, :, None])], dim=2)
    grid = F.affine_grid(theta, [n, 1, canvas, canvas], align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def generate(images: torch.Tensor, labels: torch.Tensor, *, copies: int, seed: int, strength: float = 1.0,
             canvas: int = 32) -> dict[str, torch.Tensor]:
    """Generate ``copies`` transformed images of each original (see the module docstring).

    Args:
        images: originals ``[N, 1, 8, 8]`` in ``[0, 1]``.
        labels: their labels ``[N]``.
        copies: images generated per original.
        seed: seed of every random draw.
        strength: 0 (centred, upright, no clutter or noise) to 1 (the defaults) or beyond.
        canvas: side of the generated images.

    Returns:
        ``{"x": [N*copies, 1, canvas, canvas] in [0, 1], "y": labels, "origin": index of the
        original each image shows, "fragment": index of the original its fragment was cut from
        (-1: none)}``; indices are into ``images``. Image ``i`` comes from original ``i // copies``.

    Example:
        >>> x = torch.rand(3, 1, 8, 8)
        >>> generate(x, torch.arange(3), copies=2, seed=0)["x"].shape
        torch.Size([6, 1, 32, 32])
    """
    d = DIGITS_HARD_DEFAULTS
    g = torch.Generator().manual_seed(int(seed))
    n = images.shape[0] * copies
    origin = torch.arange(images.shape[0]).repeat_interleave(copies)

    def uniform(lo, hi, size=(n,)):
        return lo + (hi - lo) * torch.rand(size, generator=g)

    def digit_pose(height):
        angle = uniform(-1.0, 1.0) * math.radians(d["rotation_deg"]) * strength
        # the rotated digit's half-diagonal must stay on the canvas
        room = (1.0 - height * math.sqrt(2) * 0.5 / canvas * 0.8).clamp_min(0.0)
        centre = uniform(-1.0, 1.0, (n, 2)) * room[:, None] * min(strength, 1.0)
        return angle, centre

    lo, hi = d["height_px"]
    mid = 0.5 * (lo + hi)
    height = mid + (uniform(lo, hi) - mid) * min(strength, 1.0)
    angle, centre = digit_pose(height)
    x = _place(images[origin], angle, height, centre, canvas)

    # A fragment of another original of the same set: half of it, cut by a random line through it.
    other = (origin + torch.randint(1, max(images.shape[0], 2), (n,), generator=g)) % images.shape[0]
    f_height = mid + (uniform(lo, hi) - mid) * min(strength, 1.0)
    f_angle = uniform(-math.pi, math.pi)
    f_centre = uniform(-0.9, 0.9, (n, 2))
    frag = _place(images[other], f_angle, f_height, f_centre, canvas)
    coords = (torch.arange(canvas, dtype=torch.float32) + 0.5) / canvas * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cut = uniform(-math.pi, math.pi)
    side = ((xx[None] - f_centre[:, 0, None, None]) * torch.cos(cut)[:, None, None]
            + (yy[None] - f_centre[:, 1, None, None]) * torch.sin(cut)[:, None, None]) > 0
    has = torch.rand(n, generator=g) < d["fragment_p"] * min(strength, 1.0)
    if images.shape[0] < 2:
        has[:] = False
    level = uniform(*d["fragment_intensity"]) * has
    x = torch.maximum(x, frag * side[:, None].float() * level[:, None, None, None])
    x = x + d["noise"] * strength * torch.randn(x.shape, generator=g)
    return {"x": x.clamp_(0.0, 1.0).contiguous(), "y": labels[origin].contiguous(), "origin": origin,
            "fragment": torch.where(has, other, torch.full_like(other, -1))}


def digits_hard_splits(*, seed: int = 0, strength: float = 1.0, copies: int | None = None,
                       canvas: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Split scikit-learn's digits into training and test originals, then generate each split.

    Args:
        seed: seed of the transforms (the origin split itself is fixed).
        strength: see :func:`generate`.
        copies: images per original (default 4).
        canvas: image side (default 32).

    Returns:
        ``{"train": ..., "test": ...}``, each what :func:`generate` returns with ``origin`` and
        ``fragment`` turned into indices of scikit-learn's 1797 digits, so that the two splits can
        be checked for shared originals.

    Example:
        >>> s = digits_hard_splits(copies=1)
        >>> s["train"]["x"].shape, s["test"]["x"].shape
        (torch.Size([1437, 1, 32, 32]), torch.Size([360, 1, 32, 32]))
    """
    d = DIGITS_HARD_DEFAULTS
    copies = d["copies"] if copies is None else copies
    canvas = d["canvas"] if canvas is None else canvas
    x, y = _originals()
    # stratified: the same number of test originals of every digit (36 of each)
    g = torch.Generator().manual_seed(_SPLIT_SEED)
    per_class = d["n_test_origins"] // 10
    test_ids = []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        test_ids.append(idx[torch.randperm(idx.numel(), generator=g)[:per_class]])
    is_test = torch.zeros(y.numel(), dtype=torch.bool)
    is_test[torch.cat(test_ids)] = True
    ids = {"test": torch.nonzero(is_test).flatten(), "train": torch.nonzero(~is_test).flatten()}
    out = {}
    for k, (name, idx) in enumerate(ids.items()):
        # each split has its own stream: the test images do not change with the training set's size
        got = generate(x[idx], y[idx], copies=copies, seed=1000 * int(seed) + k, strength=strength,
                       canvas=canvas)
        got["origin"] = idx[got["origin"]]
        got["fragment"] = torch.where(got["fragment"] >= 0, idx[got["fragment"].clamp_min(0)], got["fragment"])
        out[name] = got
    return out
