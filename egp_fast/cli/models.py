"""Model registry for the ``egp-fast`` command.

Four sources of models, all built with random weights (nothing is ever downloaded):

* ``cifar_resnet18``: the CIFAR-style ResNet-18 (3x3 stem, no max-pool) used by the EGP
  reference scripts, with a configurable width so it also fits tiny images such as the
  upsampled digits. Each block has two ReLU *modules* (``relu1`` after ``bn1``, ``relu2``
  after the residual add), so the 17 sites have readable names.
* ``digits_vit``: a small Vision Transformer for 16x16 digits (conv patchify, class token,
  learned positions, pre-norm blocks whose MLPs are ``fc1 -> GELU -> fc2`` as ``nn.Linear``
  modules, so :func:`egp_fast.collapse` can fold a linearised MLP into one linear layer);
* any torchvision classification model name (``resnet50``, ``swin_t``...), through
  ``torchvision.models.get_model(name, weights=None, num_classes=...)``;
* any timm model name (``timm:resnet18`` or a bare name timm knows), through
  ``timm.create_model(name, pretrained=False, ...)``; timm is imported only when asked for.

``load_weights`` loads a local state_dict (``weights_only=True``) into a built model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from egp_fast.errors import ModelError

__all__ = [
    "CIFAR_NAMES",
    "BasicBlock",
    "CifarResNet",
    "DigitsViT",
    "VIT_NAMES",
    "build_model",
    "cifar_resnet18",
    "digits_vit",
    "load_weights",
    "model_in_channels",
    "resolve_model_name",
]

#: names accepted for the CIFAR-style ResNet-18
CIFAR_NAMES = ("cifar_resnet18", "resnet18_cifar", "cifar-resnet18")
#: names accepted for the digits ViT
VIT_NAMES = ("digits_vit", "vit_digits")


class BasicBlock(nn.Module):
    """ResNet basic block: conv-bn-relu1-conv-bn, add the shortcut, relu2.

    Args:
        in_planes: input channels.
        planes: output channels.
        stride: stride of the first conv (and of the 1x1 downsample when needed).

    Example:
        >>> block = BasicBlock(16, 32, stride=2)
        >>> block(torch.zeros(1, 16, 8, 8)).shape
        torch.Size([1, 32, 4, 4])
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class CifarResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem without max-pool, four stages, global pool, linear head.

    Args:
        blocks: number of basic blocks per stage (ResNet-18: ``(2, 2, 2, 2)``).
        num_classes: classifier outputs.
        width: channels of the first stage; stages use width, 2w, 4w, 8w.
        in_channels: input image channels.

    Example:
        >>> net = CifarResNet((2, 2, 2, 2), num_classes=10, width=16, in_channels=1)
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """

    def __init__(self, blocks=(2, 2, 2, 2), num_classes: int = 10, width: int = 64, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=False)
        planes = width
        in_planes = width
        for i, n in enumerate(blocks):
            stride = 1 if i == 0 else 2
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, planes, stride if j == 0 else 1))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
            planes *= 2
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def cifar_resnet18(num_classes: int = 10, width: int = 64, in_channels: int = 3) -> CifarResNet:
    """Build the CIFAR-style ResNet-18 (17 ReLU sites: the stem plus two per block).

    Args:
        num_classes: classifier outputs.
        width: channels of the first stage (64 is the standard network; 16 suits 16x16 digits).
        in_channels: input image channels (1 for digits, 3 for CIFAR-10).

    Returns:
        The model, randomly initialised.

    Example:
        >>> net = cifar_resnet18(10, width=16, in_channels=1)
        >>> sum(isinstance(m, torch.nn.ReLU) for m in net.modules())
        17
    """
    if int(width) < 1:
        raise ModelError(f"width must be a positive integer, got {width!r}; pass e.g. --width 16")
    if int(num_classes) < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    return CifarResNet((2, 2, 2, 2), num_classes=num_classes, width=int(width), in_channels=in_channels)


class _Attention(nn.Module):
    """Multi-head self-attention with one ``qkv`` and one ``proj`` linear layer."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim, self.dim = heads, dim // heads, dim
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Shapes are read from x (never unpacked into Python ints), so torch.fx traces this and
        # torch.export keeps the batch dimension symbolic.
        qkv = self.qkv(x).reshape(x.shape[0], -1, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(x.shape[0], -1, self.dim))


class _Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with the GELU as a module: one activation site per block."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(self, dim: int, heads: int, mlp: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = _Mlp(dim, mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """A small Vision Transformer for small images (the digits ViT of ``--model digits_vit``).

    Conv patch embedding (kernel = stride = ``patch``), a class token and learned position
    embeddings, ``depth`` pre-norm blocks (multi-head attention, then an MLP
    ``fc1 -> GELU -> fc2``), a final LayerNorm and a linear head on the class token. Its
    ``depth`` GELU sites are named ``blocks.<i>.mlp.act``; their producers are the ``fc1``
    layers.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels.
        image_size: side of the square input images; must be divisible by ``patch``.
        patch: patch side.
        dim: embedding width; must be divisible by ``heads``.
        depth: number of transformer blocks.
        heads: attention heads.
        mlp: hidden width of each MLP.

    Example:
        >>> net = DigitsViT(10, in_channels=1, image_size=16, patch=4, dim=32, depth=2, heads=4, mlp=64)
        >>> net(torch.zeros(3, 1, 16, 16)).shape
        torch.Size([3, 10])
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 16, patch: int = 4,
                 dim: int = 64, depth: int = 6, heads: int = 4, mlp: int = 256) -> None:
        super().__init__()
        tokens = (image_size // patch) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, tokens + 1, dim))
        self.blocks = nn.Sequential(*(_Block(dim, heads, mlp) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def digits_vit(num_classes: int = 10, in_channels: int = 1, image_size: int = 16, patch: int = 4, dim: int = 64,
               depth: int = 6, heads: int = 4, mlp: int = 256) -> DigitsViT:
    """Build the digits ViT (``--model digits_vit``): 6 blocks of width 64, 17 tokens at 16x16.

    Args:
        num_classes: classifier outputs.
        in_channels: image channels (1 for digits).
        image_size: image side; divisible by ``patch``.
        patch: patch side (4: a 16x16 digit is 16 patches plus the class token).
        dim: embedding width; divisible by ``heads``.
        depth: transformer blocks (one GELU site each).
        heads: attention heads.
        mlp: MLP hidden width.

    Returns:
        The model, randomly initialised.

    Raises:
        ModelError: a size that does not divide, or a non-positive size.

    Example:
        >>> net = digits_vit(10)
        >>> sum(isinstance(m, torch.nn.GELU) for m in net.modules())
        6
        >>> net(torch.zeros(2, 1, 16, 16)).shape
        torch.Size([2, 10])
    """
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size, "patch": patch,
             "dim": dim, "depth": depth, "heads": heads, "mlp": mlp}
    bad = [k for k, v in sizes.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
    if bad:
        raise ModelError(f"digits_vit: {', '.join(f'{k}={sizes[k]!r}' for k in bad)} must be positive integers")
    if image_size % patch:
        raise ModelError(f"digits_vit: image_size={image_size} is not divisible by patch={patch}; "
                         "pick --image-size a multiple of the patch (16 for digits)")
    if dim % heads:
        raise ModelError(f"digits_vit: dim={dim} is not divisible by heads={heads}; pass e.g. --width 64")
    return DigitsViT(num_classes, in_channels, image_size, patch, dim, depth, heads, mlp)


def _torchvision_names() -> list[str]:
    try:
        import torchvision.models as tvm
    except ImportError:
        return []
    return sorted(tvm.list_models(module=tvm))


def resolve_model_name(name: str) -> tuple[str, str]:
    """Say which source builds ``name``.

    Args:
        name: ``cifar_resnet18``, ``digits_vit``, a torchvision classification model name,
            ``timm:<name>``, or a bare timm model name.

    Returns:
        ``(source, name)`` with source ``"cifar"``, ``"vit"``, ``"torchvision"`` or ``"timm"`` and the
        name without its ``timm:`` prefix.

    Raises:
        ModelError: the name is unknown to all three sources.

    Example:
        >>> resolve_model_name("resnet18")
        ('torchvision', 'resnet18')
    """
    if not isinstance(name, str) or not name:
        raise ModelError(f"model name must be a non-empty string, got {name!r}")
    if name in CIFAR_NAMES:
        return "cifar", "cifar_resnet18"
    if name in VIT_NAMES:
        return "vit", "digits_vit"
    if name.startswith("timm:"):
        bare = name[len("timm:"):]
        timm = _import_timm(name)
        if not timm.is_model(bare):
            raise ModelError(f"unknown timm model {bare!r} in --model {name}; see timm.list_models()")
        return "timm", bare
    if name in _torchvision_names():
        return "torchvision", name
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(name):
        return "timm", name
    raise ModelError(
        f"unknown model {name!r}: use cifar_resnet18, digits_vit, a torchvision classification model name "
        "(torchvision.models.list_models()) or timm:<name>"
    )


def _import_timm(name: str):
    try:
        import timm
    except ImportError as e:  # optional dependency: say how to get it
        raise ModelError(f"model {name!r} needs timm: pip install timm (or egp_fast[timm])") from e
    return timm


def model_in_channels(name: str, data_channels: int) -> int:
    """Input channels the model built for ``name`` will expect given data with ``data_channels``.

    torchvision models have a fixed 3-channel stem, so grey images are repeated to 3 channels
    for them; the CIFAR ResNet and timm models adapt their stem to the data instead.

    Args:
        name: model name as accepted by :func:`build_model`.
        data_channels: channels of the images the data source yields natively.

    Returns:
        The number of channels the data loader must produce.

    Example:
        >>> model_in_channels("resnet18", 1)
        3
    """
    source, _ = resolve_model_name(name)
    return 3 if source == "torchvision" else data_channels


def build_model(name: str, num_classes: int, *, in_channels: int = 3, width: int = 64,
                image_size: int = 16) -> nn.Module:
    """Build a classification model with random weights.

    Args:
        name: see :func:`resolve_model_name`.
        num_classes: classifier outputs.
        in_channels: input channels (torchvision models always take 3).
        width: first-stage width of ``cifar_resnet18``, embedding width of ``digits_vit``
            (ignored by the other sources).
        image_size: input image side, used by ``digits_vit`` (its position embeddings).

    Returns:
        The model in training mode on the CPU.

    Raises:
        ModelError: unknown name, a missing optional dependency, or a model the source cannot
            build with these arguments.

    Example:
        >>> net = build_model("cifar_resnet18", 10, in_channels=1, width=8)
        >>> net(torch.zeros(1, 1, 16, 16)).shape
        torch.Size([1, 10])
    """
    source, bare = resolve_model_name(name)
    if source == "cifar":
        return cifar_resnet18(num_classes, width=width, in_channels=in_channels)
    if source == "vit":
        return digits_vit(num_classes, in_channels=in_channels, image_size=image_size, dim=width)
    if source == "torchvision":
        if in_channels != 3:
            raise ModelError(
                f"torchvision model {bare!r} takes 3 input channels, the data gives {in_channels}; "
                "use model_in_channels() to pick the loader's channels"
            )
        import torchvision.models as tvm

        try:
            return tvm.get_model(bare, weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as e:
            raise ModelError(f"torchvision cannot build {bare!r} for {num_classes} classes: {e}") from e
    timm = _import_timm(name)
    try:
        return timm.create_model(bare, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ModelError(f"timm cannot build {bare!r}: {e}") from e


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a local state_dict into ``model`` (``torch.load(..., weights_only=True)``).

    Accepts a plain state_dict or a dict holding one under ``"model"`` or ``"state_dict"``
    (as training scripts often save). Masks (``*.weight_mask``) in the file are restored via
    :func:`egp_fast.load_pruned_state_dict` when present.

    Args:
        model: the freshly built model.
        path: a ``.pt``/``.pth`` file on disk.

    Returns:
        ``model``, with the weights loaded.

    Raises:
        ModelError: the file is missing, unreadable, or its keys/shapes don't match the model.

    Example:
        >>> net = cifar_resnet18(10, width=8)
        >>> torch.save(net.state_dict(), "/tmp/w.pt")
        >>> _ = load_weights(cifar_resnet18(10, width=8), "/tmp/w.pt")
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelError(f"--weights {path}: no such file; pass a state_dict saved with torch.save")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unpickling failure means the file is not a plain state_dict
        raise ModelError(f"--weights {path}: cannot be read as a state_dict ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelError(f"--weights {path}: expected a state_dict (name -> tensor)")
    obj = {k.removeprefix("module."): v for k, v in obj.items()}
    try:
        if any(k.endswith(".weight_mask") for k in obj):
            from egp_fast.masks import load_pruned_state_dict

            load_pruned_state_dict(model, obj)
        else:
            model.load_state_dict(obj, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise ModelError(
            f"--weights {path} does not match the model: {' '.join(first[:3])[:400]}"
        ) from e
    return model
