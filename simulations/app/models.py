"""Models for the experiments, each with a choice of normalisation layer.

:func:`build_model` builds one of:

- ``"cnn"``: a small, fast two-convolution CNN;
- ``"resnet20"``: the CIFAR ResNet-20 of He et al. (2016), with option-A shortcuts;
- ``"vgg"``: a small VGG-style CNN;
- ``"mlp"``: a two-hidden-layer perceptron;
- ``"twice-bn"``: a tiny test network that calls one normalisation module twice;
- ``"timm:<name>"``: any timm model, ``timm.create_model(<name>, pretrained=False, ...)``
  (randomly initialised, never downloaded; needs ``pip install timm``).

``norm`` selects the normalisation layers:

- ``"bn"``: ``nn.BatchNorm2d`` after convolutions, ``nn.BatchNorm1d`` in dense heads;
- ``"gn"``: ``nn.GroupNorm(2, C)`` after convolutions (two groups, a common choice for
  federated GroupNorm baselines) and ``nn.GroupNorm(1, C)`` on feature vectors (which is
  LayerNorm over the features with a per-feature affine transform);
- ``"none"``: no normalisation; convolutions then carry a bias.

Every convolutional model ends in an adaptive pooling layer, so the same model accepts
28x28 (Fashion-MNIST, MNIST) and 32x32 (CIFAR-10) inputs. Initialisation uses only
torch's global generator: a model built after ``torch.manual_seed(s)`` is the same for
the same ``s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "MODEL_NAMES",
    "NORMS",
    "GROUP_NORM_GROUPS",
    "TIMM_PREFIX",
    "build_model",
    "build_timm_model",
    "count_batchnorm_layers",
    "SmallCNN",
    "ResNet20",
    "SmallVGG",
    "MLP",
    "TwiceBN",
]

MODEL_NAMES = ("cnn", "resnet20", "vgg", "mlp", "twice-bn")
TIMM_PREFIX = "timm:"
"""Model names ``"timm:<name>"`` build ``timm.create_model(<name>, pretrained=False, ...)``."""
NORMS = ("bn", "gn", "none")
GROUP_NORM_GROUPS = 2
"""Number of groups of every ``nn.GroupNorm`` after a convolution when ``norm="gn"``."""


def _check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; valid norms: {', '.join(NORMS)}")


def _norm2d(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for feature maps ``(N, C, H, W)``."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    if norm == "gn":
        return nn.GroupNorm(GROUP_NORM_GROUPS, channels)
    return nn.Identity()


def _norm1d(norm: str, features: int) -> nn.Module:
    """Normalisation layer for feature vectors ``(N, C)``."""
    if norm == "bn":
        return nn.BatchNorm1d(features)
    if norm == "gn":
        return nn.GroupNorm(1, features)
    return nn.Identity()


def _conv3x3(
    in_channels: int, out_channels: int, norm: str, stride: int = 1
) -> nn.Conv2d:
    # A bias right before a normalisation layer is cancelled by its mean subtraction.
    return nn.Conv2d(
        in_channels, out_channels, 3, stride=stride, padding=1, bias=norm == "none"
    )


class SmallCNN(nn.Module):
    """Two convolution blocks and a dense head: fast on a CPU.

    ``conv(16)-norm-ReLU-maxpool, conv(32)-norm-ReLU-maxpool, avgpool to 4x4,
    Linear(512, 128)-norm-ReLU, Linear(128, num_classes)`` with the default widths.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Channels of the input images.
    norm : str
        ``"bn"``, ``"gn"`` or ``"none"``.
    widths : tuple of int
        Channels of the two convolutions. Doubling them (32, 64) costs about three
        times the compute for a small gain in accuracy.
    hidden : int
        Width of the dense hidden layer.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        norm: str = "bn",
        widths: tuple[int, int] = (16, 32),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        _check_norm(norm)
        first, second = widths
        self.features = nn.Sequential(
            _conv3x3(in_channels, first, norm),
            _norm2d(norm, first),
            nn.ReLU(),
            nn.MaxPool2d(2),
            _conv3x3(first, second, norm),
            _norm2d(norm, second),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(second * 4 * 4, hidden, bias=norm == "none"),
            _norm1d(norm, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class _BasicBlock(nn.Module):
    """ResNet basic block with a parameter-free ("option A") shortcut.

    When the block changes resolution or width, the shortcut takes every second pixel
    and pads the new channels with zeros, as in the CIFAR experiments of He et al.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, norm, stride=stride)
        self.bn1 = _norm2d(norm, out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels, norm)
        self.bn2 = _norm2d(norm, out_channels)
        self.stride = stride
        self.extra_channels = out_channels - in_channels
        if self.extra_channels < 0:
            raise ValueError("option-A shortcuts cannot reduce the number of channels")

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.extra_channels:
            before = self.extra_channels // 2
            x = F.pad(x, (0, 0, 0, 0, before, self.extra_channels - before))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return ``relu(residual(x) + shortcut(x))``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self._shortcut(x))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al., 2016), about 0.27M parameters.

    A 3x3 convolution with 16 channels, then three stages of three basic blocks with
    16, 32 and 64 channels (stride 2 at the start of the second and third stages),
    global average pooling and a linear classifier. With ``norm="bn"`` it has 19
    ``BatchNorm2d`` layers; shortcuts have no parameters and no normalisation.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Channels of the input images.
    norm : str
        ``"bn"``, ``"gn"`` or ``"none"``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "bn") -> None:
        super().__init__()
        _check_norm(norm)
        self.conv1 = _conv3x3(in_channels, 16, norm)
        self.bn1 = _norm2d(norm, 16)
        stages = []
        in_width = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for block_index in range(3):
                blocks.append(
                    _BasicBlock(in_width, width, stride if block_index == 0 else 1, norm)
                )
                in_width = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)``."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        return self.fc(torch.flatten(self.pool(out), 1))


class SmallVGG(nn.Module):
    """Small VGG-style network, about 0.8M parameters.

    ``[conv(64)-norm-ReLU] x2, maxpool, [conv(128)-norm-ReLU] x2, maxpool, avgpool to
    4x4, Linear(2048, 256)-norm-ReLU-Dropout(0.5), Linear(256, num_classes)``.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Channels of the input images.
    norm : str
        ``"bn"``, ``"gn"`` or ``"none"``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, norm: str = "bn") -> None:
        super().__init__()
        _check_norm(norm)
        layers: list[nn.Module] = []
        width_in = in_channels
        for width in (64, 64, "pool", 128, 128, "pool"):
            if width == "pool":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [_conv3x3(width_in, width, norm), _norm2d(norm, width), nn.ReLU()]
            width_in = width
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(128 * 4 * 4, 256, bias=norm == "none"),
            _norm1d(norm, 256),
            nn.ReLU(),
            nn.Dropout(0.5),
            nn.Linear(256, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)``."""
        return self.classifier(self.features(x))


class MLP(nn.Module):
    """Perceptron with two hidden layers: ``[Linear-norm-ReLU] x2, Linear``.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_features : int
        Number of input values per example (``C * H * W`` of the images).
    hidden : int
        Width of the hidden layers.
    norm : str
        ``"bn"``, ``"gn"`` or ``"none"``.
    """

    def __init__(
        self, num_classes: int = 10, in_features: int = 784, hidden: int = 200, norm: str = "bn"
    ) -> None:
        super().__init__()
        _check_norm(norm)
        self.in_features = in_features
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden, bias=norm == "none"),
            _norm1d(norm, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden, bias=norm == "none"),
            _norm1d(norm, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)``."""
        if x.shape[1:].numel() != self.in_features:
            raise ValueError(
                f"MLP built for {self.in_features} input values per example, got input "
                f"of shape {tuple(x.shape)}; pass image_size to build_model"
            )
        return self.net(x)


class TwiceBN(nn.Module):
    """Test network that calls one normalisation module twice per forward pass.

    ``conv1 -> bn -> ReLU -> conv2 -> bn (the same module) -> ReLU -> global avgpool ->
    Linear``. It exercises code that must tell the calls of one layer apart.

    Parameters
    ----------
    num_classes : int
        Number of output logits.
    in_channels : int
        Channels of the input images.
    norm : str
        ``"bn"``, ``"gn"`` or ``"none"``.
    width : int
        Channels of both convolutions (and of the shared normalisation layer).
    """

    def __init__(
        self, num_classes: int = 10, in_channels: int = 1, norm: str = "bn", width: int = 8
    ) -> None:
        super().__init__()
        _check_norm(norm)
        self.conv1 = _conv3x3(in_channels, width, norm)
        self.conv2 = _conv3x3(width, width, norm)
        self.bn = _norm2d(norm, width)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits of shape ``(N, num_classes)``."""
        out = F.relu(self.bn(self.conv1(x)))
        out = F.relu(self.bn(self.conv2(out)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(out, 1), 1))


def build_model(
    name: str,
    num_classes: int = 10,
    in_channels: int = 1,
    norm: str = "bn",
    *,
    image_size: int = 28,
) -> nn.Module:
    """Build a freshly initialised model.

    Parameters
    ----------
    name : str
        One of :data:`MODEL_NAMES`: ``"cnn"``, ``"resnet20"``, ``"vgg"``, ``"mlp"``,
        ``"twice-bn"``; or ``"timm:<name>"`` for a timm model (see :func:`build_timm_model`).
    num_classes : int
        Number of output logits.
    in_channels : int
        Channels of the input images (1 for Fashion-MNIST/MNIST, 3 for CIFAR-10).
    norm : str
        ``"bn"`` (BatchNorm), ``"gn"`` (GroupNorm) or ``"none"``; see the module docstring.
    image_size : int
        Height (= width) of the input images. Only the MLP depends on it; the
        convolutional models accept any size from 28 up.

    Returns
    -------
    nn.Module
        The model, in training mode.

    Raises
    ------
    ValueError
        If ``name`` or ``norm`` is unknown, or ``norm`` is not ``"bn"`` for a timm model.
    ImportError
        If a timm model is asked for and timm is not installed.
    """
    _check_norm(norm)
    if name.startswith(TIMM_PREFIX):
        return build_timm_model(name[len(TIMM_PREFIX):], num_classes, in_channels, norm)
    if name == "cnn":
        return SmallCNN(num_classes, in_channels, norm)
    if name == "resnet20":
        return ResNet20(num_classes, in_channels, norm)
    if name == "vgg":
        return SmallVGG(num_classes, in_channels, norm)
    if name == "mlp":
        return MLP(num_classes, in_channels * image_size * image_size, norm=norm)
    if name == "twice-bn":
        return TwiceBN(num_classes, in_channels, norm)
    raise ValueError(
        f"unknown model {name!r}; valid models: {', '.join(MODEL_NAMES)}, or {TIMM_PREFIX}<name> for a timm model"
    )


def build_timm_model(name: str, num_classes: int = 10, in_channels: int = 1, norm: str = "bn") -> nn.Module:
    """A randomly initialised timm model: ``timm.create_model(name, pretrained=False, ...)``.

    Weights are never downloaded. timm is imported only here, so the other models work
    without it.

    Parameters
    ----------
    name : str
        A timm model name (``timm.list_models()``), e.g. ``"mobilenetv3_small_100"``.
    num_classes : int
        Number of output logits (timm's ``num_classes``).
    in_channels : int
        Channels of the input images (timm's ``in_chans``).
    norm : str
        Must be ``"bn"``: a timm model keeps the normalisation layers it is defined with.

    Returns
    -------
    nn.Module
        The model, in training mode.

    Raises
    ------
    ImportError
        If timm is not installed (fix: ``pip install timm``).
    ValueError
        If ``name`` is empty or not a timm model, or ``norm`` is not ``"bn"``.
    """
    if norm != "bn":
        raise ValueError(
            f"model {TIMM_PREFIX}{name} keeps timm's own normalisation layers; norm={norm!r} is not "
            f"available for timm models (use a strategy whose model norm is 'bn', or one of {', '.join(MODEL_NAMES)})"
        )
    if not name:
        raise ValueError(f"model {TIMM_PREFIX!r} names no timm model; write e.g. '{TIMM_PREFIX}mobilenetv3_small_100'")
    try:
        import timm
    except ImportError as error:
        raise ImportError(
            f"model {TIMM_PREFIX}{name} needs the timm package, which is not installed; fix: pip install timm"
        ) from error
    if not timm.is_model(name):
        raise ValueError(
            f"unknown timm model {name!r} (model {TIMM_PREFIX}{name}); see timm.list_models() for valid names"
        )
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels).train()


def count_batchnorm_layers(model: nn.Module) -> int:
    """Count the BatchNorm modules of ``model``.

    Parameters
    ----------
    model : nn.Module
        Any model.

    Returns
    -------
    int
        Number of submodules that are instances of ``torch.nn.modules.batchnorm._BatchNorm``
        (``BatchNorm1d/2d/3d``, ``SyncBatchNorm`` and subclasses). A module called several
        times in the forward pass counts once.
    """
    return sum(isinstance(module, _BatchNorm) for module in model.modules())
