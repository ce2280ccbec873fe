"""Small plain-PyTorch models for structural-pruning tests and benchmarks.

Each model is built from standard ``nn`` modules and plain tensor code. No forward pass
hard-codes a size: head counts come from ``view(..., -1, head_dim)``, spatial sizes and
batch sizes from the tensors themselves. Removing channels, heads, neurons or width from
the parameters therefore leaves a model that still runs.

Architectures follow, in miniature:

- :class:`ResNetLike`: He et al. 2016, "Deep Residual Learning for Image Recognition"
  (basic blocks, 1x1 projection shortcut).
- :class:`MobileNetLike`: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks" (expand / depthwise / project), plus a grouped projection as in Zhang et al.
  2018, "ShuffleNet".
- :class:`UNetLike`: Ronneberger et al. 2015, "U-Net" (skip concatenation).
- :class:`SmallCNN`: a plain conv net whose last feature map is flattened into a Linear.
- :class:`ViT`: Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words" (pre-norm).
- :class:`BertLike`: Devlin et al. 2019, "BERT" (post-norm encoder).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError


def _conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(out_ch)]


# --------------------------------------------------------------------------------------- CNNs


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a residual add; a 1x1 conv-BN projection when the shape changes."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv_bn(in_ch, out_ch, 3, stride)
        self.conv2, self.bn2 = _conv_bn(out_ch, out_ch, 3)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(*_conv_bn(in_ch, out_ch, 1, stride))

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNetLike(nn.Module):
    """Stem, three basic blocks (identity; projection with stride 2; identity), pool, linear head."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_ch, width), nn.ReLU())
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride=2)
        self.layer3 = BasicBlock(2 * width, 2 * width)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, num_classes)
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))  # (B, C, 1, 1) -> (B, C)


class InvertedResidual(nn.Module):
    """Pointwise expand, depthwise 3x3, pointwise (optionally grouped) linear projection.

    The residual is added when stride is 1 and the input and output widths match.
    """

    def __init__(self, in_ch: int, out_ch: int, expand: int = 4, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.expand = nn.Sequential(*_conv_bn(in_ch, hidden, 1), nn.ReLU6())
        self.depthwise = nn.Sequential(*_conv_bn(hidden, hidden, 3, stride, groups=hidden), nn.ReLU6())
        self.project = nn.Sequential(*_conv_bn(hidden, out_ch, 1, groups=groups))
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H/s, W/s)
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


class MobileNetLike(nn.Module):
    """Stem, three inverted residual blocks (the last two with a ``groups=2`` projection),
    a 1x1 head conv, pool, linear classifier."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(in_ch, width, 3, 2), nn.ReLU6())
        self.blocks = nn.Sequential(
            InvertedResidual(width, width, expand=4),
            InvertedResidual(width, 2 * width, expand=4, stride=2, groups=2),
            InvertedResidual(2 * width, 2 * width, expand=4, groups=2),
        )
        self.head = nn.Sequential(*_conv_bn(2 * width, 4 * width, 1), nn.ReLU6())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, num_classes)
        x = self.head(self.blocks(self.stem(x)))
        return self.fc(self.pool(x).flatten(1))


class DoubleConv(nn.Module):
    """Two conv-BN-ReLU layers (the U-Net stage)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(in_ch, out_ch), nn.ReLU(), *_conv_bn(out_ch, out_ch), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class UNetLike(nn.Module):
    """Two-level U-Net: encoder stages with max-pool, a bottleneck, a decoder that upsamples
    once with a transposed conv and once with ``F.interpolate``, each followed by skip
    concatenation along channels, and a final 1x1 conv. H and W must be divisible by 4."""

    def __init__(self, in_ch: int = 1, out_ch: int = 1, width: int = 8) -> None:
        super().__init__()
        self.enc1 = DoubleConv(in_ch, width)
        self.enc2 = DoubleConv(width, 2 * width)
        self.bottleneck = DoubleConv(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, kernel_size=2, stride=2)
        self.dec2 = DoubleConv(4 * width, 2 * width)
        self.dec1 = DoubleConv(3 * width, width)
        self.out = nn.Conv2d(width, out_ch, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, out_ch, H, W)
        e1 = self.enc1(x)  # (B, w, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2w, H/2, W/2)
        b = self.bottleneck(F.max_pool2d(e2, 2))  # (B, 4w, H/4, W/4)
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))  # cat: (B, 2w + 2w, H/2, W/2)
        up1 = F.interpolate(d2, size=e1.shape[-2:], mode="nearest")  # (B, 2w, H, W)
        d1 = self.dec1(torch.cat([up1, e1], dim=1))  # cat: (B, 2w + w, H, W)
        return self.out(d1)


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU layers with three 2x2 max-pools (28 -> 14 -> 7 -> 3), the feature map
    flattened into a hidden Linear, then the classifier Linear. About 141k parameters at
    ``width=32`` for 28x28 inputs; the flatten couples each last-conv channel to
    ``3 * 3`` input features of ``fc1``."""

    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 32, image_size: int = 28) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *_conv_bn(in_ch, width), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(width, width), nn.ReLU(),
            *_conv_bn(width, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
            *_conv_bn(2 * width, 2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = image_size // 8
        self.fc1 = nn.Linear(2 * width * side * side, 4 * width)
        self.fc2 = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, num_classes)
        x = self.features(x)  # (B, 2w, H/8, W/8)
        x = x.view(x.shape[0], -1)  # (B, 2w * H/8 * W/8)
        return self.fc2(F.relu(self.fc1(x)))


# ------------------------------------------------------------------------------ transformers


class Attention(nn.Module):
    """Multi-head attention with separate q/k/v/o Linears and ``F.scaled_dot_product_attention``.

    ``head_dim`` is fixed; the number of heads is read from the projections' widths at run
    time (``view(B, T, -1, head_dim)``), so whole heads can be removed.
    """

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"dim={dim} is not divisible by heads={heads}; pick heads dividing dim")
        self.head_dim = dim // heads
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.o = nn.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:  # (B, T, D) -> (B, T, D)
        b, t = x.shape[0], x.shape[1]

        def heads(y: Tensor) -> Tensor:  # (B, T, H*hd) -> (B, H, T, hd)
            return y.view(b, t, -1, self.head_dim).transpose(1, 2)

        y = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, H*hd)


class MLP(nn.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, T, D)
        return self.fc2(F.gelu(self.fc1(x)))


class PreNormBlock(nn.Module):
    """``x + attn(ln1(x))`` then ``x + mlp(ln2(x))`` (ViT)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads)
        self.ln2, self.mlp = nn.LayerNorm(dim), MLP(dim, mlp_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class PostNormBlock(nn.Module):
    """``ln1(x + attn(x))`` then ``ln2(x + mlp(x))`` (BERT)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.attn, self.ln1 = Attention(dim, heads), nn.LayerNorm(dim)
        self.mlp, self.ln2 = MLP(dim, mlp_dim), nn.LayerNorm(dim)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.ln1(x + self.attn(x, mask))
        return self.ln2(x + self.mlp(x))


class ViT(nn.Module):
    """Vision transformer: conv patch embedding, cls token, learned position embedding,
    pre-norm blocks, final LayerNorm on the cls token, linear head."""

    def __init__(self, image_size: int = 28, patch: int = 7, in_ch: int = 1, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_dim: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        if image_size % patch:
            raise ConfigError(f"image_size={image_size} is not divisible by patch={patch}")
        self.patch_embed = nn.Conv2d(in_ch, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (image_size // patch) ** 2 + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(PreNormBlock(dim, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, in_ch, H, W) -> (B, num_classes)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N+1, D)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


class BertLike(nn.Module):
    """BERT-style encoder: token + position embeddings, embedding LayerNorm, post-norm blocks.

    ``forward(input_ids (B, T), attention_mask (B, T) or None) -> (B, T, dim)``; a mask of
    ones and zeros hides the zero (padding) positions from every query.
    """

    def __init__(self, vocab: int = 1000, dim: int = 64, depth: int = 2, heads: int = 4, mlp_dim: int = 128,
                 max_len: int = 128) -> None:
        super().__init__()
        self.tok_embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Embedding(max_len, dim)
        self.norm = nn.LayerNorm(dim)
        self.blocks = nn.ModuleList(PostNormBlock(dim, heads, mlp_dim) for _ in range(depth))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        x = self.norm(self.tok_embed(input_ids) + self.pos_embed(positions))  # (B, T, D)
        mask = None
        if attention_mask is not None:
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, T): True = attend
        for block in self.blocks:
            x = block(x, mask)
        return x


# ------------------------------------------------------------------------------- registry

ZOO: dict[str, Callable[[], nn.Module]] = {
    "resnet": ResNetLike,
    "mobilenet": MobileNetLike,
    "unet": UNetLike,
    "smallcnn": SmallCNN,
    "vit": ViT,
    "bert": BertLike,
}


def example_input(name: str, batch: int = 2, seed: int = 0) -> Tensor:
    """A deterministic input of the right shape for ``ZOO[name]()`` with default arguments:
    images ``(batch, 1, 28, 28)`` for the vision models, token ids ``(batch, 16)`` for BERT."""
    if name not in ZOO:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of {sorted(ZOO)}")
    g = torch.Generator().manual_seed(seed)
    if name == "bert":
        return torch.randint(0, 1000, (batch, 16), generator=g)
    return torch.rand(batch, 1, 28, 28, generator=g)


__all__ = ["ZOO", "example_input", "ResNetLike", "MobileNetLike", "UNetLike", "SmallCNN", "ViT", "BertLike"]
