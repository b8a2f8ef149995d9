"""Networks: DeepCluster's AlexNet-BN with Sobel, ResNet-18/50, and a small CNN for the CPU demo.

Every model exposes `features(x)` (the embedding that is clustered), `head` (a linear classifier
over pseudo-labels, re-initialized every epoch by `reset_head`), `feature_dim`, and `layer_names`:
its named blocks, for probes and activation analyses.
"""

from __future__ import annotations

import torch
from torch import nn

from cluster_pipeline.config import ModelConfig


class Sobel(nn.Module):
    """Fixed grayscale + Sobel filters (DeepCluster): with no color, k-means cannot use it."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.gray: nn.Module
        if in_channels == 3:
            conv = nn.Conv2d(3, 1, 1, bias=False)
            conv.weight.data.fill_(1.0 / 3.0)
            self.gray = conv
        else:
            self.gray = nn.Identity()
        sobel = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        kx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        sobel.weight.data.copy_(torch.stack([kx, kx.t()]).unsqueeze(1))
        self.sobel = sobel
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sobel(self.gray(x))


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True)]


class ClusterNet(nn.Module):
    """Shared frame: optional Sobel, named blocks, an embedding, and a resettable head."""

    layer_names: tuple[str, ...] = ()

    def __init__(self, in_channels: int, sobel: bool) -> None:
        super().__init__()
        self.input_layer: nn.Module = Sobel(in_channels) if sobel else nn.Identity()
        self.stem_channels = 2 if sobel else in_channels
        self.feature_dim = 0
        self.head: nn.Linear = nn.Linear(1, 1)
        # ReLU between a pre-activation embedding and the head (DeepCluster clusters pre-ReLU fc7).
        self.head_act: nn.Module = nn.Identity()

    def body(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.layer_names:
            x = getattr(self, name)(x)
        return x

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.body(self.input_layer(x)))

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """The head's outputs; for a list of batches (multi-crop views of other sizes), one
        pass through the body per batch, their embeddings concatenated in order, then the
        head on all of them: one forward for DDP (swav's multi-resolution forward)."""
        if isinstance(x, list):
            return self.head(self.head_act(torch.cat([self.features(v) for v in x])))
        return self.head(self.head_act(self.features(x)))

    def set_head(self, num_classes: int) -> None:
        self.head = nn.Linear(self.feature_dim, num_classes)


class ProjectionHead(nn.Module):
    """DeepCluster-v2's (and swav's) projection: Linear, BatchNorm, ReLU, Linear; the caller
    L2-normalizes its output before the dot products with the prototypes."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(True),
            nn.Linear(hidden, out_dim),
        )  # fmt: skip
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class SmallCNN(ClusterNet):
    """Three conv blocks and a 128-d embedding: seconds per MNIST epoch on two CPU cores."""

    layer_names = ("block1", "block2", "block3")

    def __init__(self, in_channels: int, num_classes: int, sobel: bool, width: int) -> None:
        super().__init__(in_channels, sobel)
        w = width
        c = self.stem_channels
        self.block1 = nn.Sequential(*_conv_bn(c, w), *_conv_bn(w, w), nn.MaxPool2d(2))
        self.block2 = nn.Sequential(*_conv_bn(w, 2 * w), *_conv_bn(2 * w, 2 * w), nn.MaxPool2d(2))
        self.block3 = nn.Sequential(*_conv_bn(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(4 * w, 128)
        self.feature_dim = 128
        self.head_act = nn.ReLU()
        self.set_head(num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(x, 1))


class AlexNetBN(ClusterNet):
    """DeepCluster's AlexNet: LRN replaced by BatchNorm, Sobel input, 4096-d fc7 embedding."""

    layer_names = ("conv1", "conv2", "conv3", "conv4", "conv5")

    def __init__(self, in_channels: int, num_classes: int, sobel: bool) -> None:
        super().__init__(in_channels, sobel)
        c = self.stem_channels
        self.conv1 = nn.Sequential(*_conv_bn(c, 96, 11, 4, 2), nn.MaxPool2d(3, 2))
        self.conv2 = nn.Sequential(*_conv_bn(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2))
        self.conv3 = nn.Sequential(*_conv_bn(256, 384))
        self.conv4 = nn.Sequential(*_conv_bn(384, 384))
        self.conv5 = nn.Sequential(*_conv_bn(384, 256), nn.MaxPool2d(3, 2))
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(0.5),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(True),
            nn.Dropout(0.5),
            nn.Linear(4096, 4096),
        )
        self.feature_dim = 4096
        self.head_act = nn.ReLU()
        self.set_head(num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.down = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.down(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.down = _downsample(cin, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        return torch.relu(self.bn3(self.conv3(out)) + self.down(x))


def _downsample(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class ResNet(ClusterNet):
    layer_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        depths: tuple[int, int, int, int],
        in_channels: int,
        num_classes: int,
        sobel: bool,
    ) -> None:
        super().__init__(in_channels, sobel)
        self.stem = nn.Sequential(*_conv_bn(self.stem_channels, 64, 7, 2, 3), nn.MaxPool2d(3, 2, 1))
        cin = 64
        for i, (planes, depth) in enumerate(zip((64, 128, 256, 512), depths, strict=True)):
            blocks: list[nn.Module] = []
            for j in range(depth):
                blocks.append(block(cin, planes, 2 if (j == 0 and i > 0) else 1))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.weight.requires_grad:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.set_head(num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(x), 1)


def build_model(cfg: ModelConfig, in_channels: int, num_classes: int) -> ClusterNet:
    if cfg.arch == "small_cnn":
        return SmallCNN(in_channels, num_classes, cfg.sobel, cfg.width)
    if cfg.arch == "alexnet_bn":
        return AlexNetBN(in_channels, num_classes, cfg.sobel)
    if cfg.arch == "resnet18":
        return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes, cfg.sobel)
    if cfg.arch == "resnet50":
        return ResNet(Bottleneck, (3, 4, 6, 3), in_channels, num_classes, cfg.sobel)
    raise ValueError(f"model.arch={cfg.arch!r} is unknown")


def reset_head(model: ClusterNet, generator: torch.Generator) -> None:
    """A new classifier head, in place (DeepCluster: N(0, 0.01) weights, zero bias).

    In place keeps the same Parameters, so DDP's registration stays valid; the same generator
    seed on every rank gives every rank the same head.
    """
    with torch.no_grad():
        w = torch.randn(model.head.weight.shape, generator=generator) * 0.01
        model.head.weight.copy_(w)
        model.head.bias.zero_()
