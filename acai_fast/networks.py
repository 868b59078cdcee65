"""The ACAI networks (SPEC.md section 1): encoder, decoder, critic and the linear probe.

Every network is a chain of `ConvBlock`s, each one `conv_block` op: an optional nearest 2x upsample
of its input, a same-padded stride-1 conv with bias, an optional leaky ReLU (slope 0.2) and an
optional 2x2 average pool. The same modules run on the reference (plain PyTorch) or fused backends;
`backend` is a plain attribute of each network, so the parameters never change with it.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import ACAIConfig
from .ops.conv_block import conv_block

LEAKY_SLOPE = 0.2


def he_modified_std(fan_in: int, slope: float = LEAKY_SLOPE) -> float:
    """The paper's init: std = 1 / sqrt((1 + slope^2) * fan_in), fan_in = k * k * in_channels."""
    return 1.0 / math.sqrt((1.0 + slope ** 2) * fan_in)


class ConvBlock(nn.Module):
    """One conv layer with its fused neighbours: pool(act(conv(upsample(x))))."""

    def __init__(self, cin: int, cout: int, kernel: int, *, act: bool, pool_output: bool = False,
                 upsample_input: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.leaky_slope = LEAKY_SLOPE if act else None
        self.pool_output = pool_output
        self.upsample_input = upsample_input
        self.reset_parameters()

    def reset_parameters(self) -> None:
        cout, cin, kh, kw = self.weight.shape
        with torch.no_grad():
            self.weight.normal_(0.0, he_modified_std(cin * kh * kw))
            self.bias.zero_()

    def forward(self, x: torch.Tensor, backend: str = "reference") -> torch.Tensor:
        return conv_block(x, self.weight, self.bias, upsample_input=self.upsample_input,
                          leaky_slope=self.leaky_slope, pool_output=self.pool_output, backend=backend)

    def extra_repr(self) -> str:
        cout, cin, k, _ = self.weight.shape
        flags = [f"{cin}->{cout}", f"k={k}"]
        flags += ["upsample2x"] * self.upsample_input + ["lrelu"] * (self.leaky_slope is not None)
        flags += ["avgpool2x2"] * self.pool_output
        return ", ".join(flags)


class ConvChain(nn.Module):
    """A sequence of ConvBlocks run on `self.backend` ("reference" or a fused backend)."""

    def __init__(self, blocks: list[ConvBlock]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.backend = "reference"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, backend=self.backend)
        return x


class Encoder(ConvChain):
    """(N, colors, 32, 32) -> (N, latent, 32 >> scales, 32 >> scales)."""

    def __init__(self, colors: int, depth: int, scales: int, latent: int):
        blocks = [ConvBlock(colors, depth, 1, act=False)]
        cin = depth
        for s in range(scales):
            blocks.append(ConvBlock(cin, depth << s, 3, act=True))
            blocks.append(ConvBlock(depth << s, depth << s, 3, act=True, pool_output=True))
            cin = depth << s
        blocks.append(ConvBlock(cin, depth << scales, 3, act=True))
        blocks.append(ConvBlock(depth << scales, latent, 3, act=False))
        super().__init__(blocks)


class Decoder(ConvChain):
    """(N, latent, w, w) -> (N, colors, w << scales, w << scales); no output squashing."""

    def __init__(self, latent: int, depth: int, scales: int, colors: int):
        blocks = []
        cin, upsample = latent, False
        for s in range(scales - 1, -1, -1):
            blocks.append(ConvBlock(cin, depth << s, 3, act=True, upsample_input=upsample))
            blocks.append(ConvBlock(depth << s, depth << s, 3, act=True))
            cin, upsample = depth << s, True  # the 2x upsample after this pair feeds the next conv
        blocks.append(ConvBlock(cin, depth, 3, act=True, upsample_input=upsample))
        blocks.append(ConvBlock(depth, colors, 3, act=False))
        super().__init__(blocks)


class Critic(Encoder):
    """An encoder of its own whose output map is averaged to one scalar per image: (N,)."""

    def forward_map(self, x: torch.Tensor) -> torch.Tensor:
        """The output map before its mean, (N, latent, w, w): what the fused ACAI loss reads."""
        return super().forward(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_map(x).mean(dim=(1, 2, 3))


class LinearProbe(nn.Module):
    """Flatten the (detached) latent -> dense -> logits; glorot-uniform kernel, zero bias
    (TensorFlow's tf.layers.dense defaults, as in the paper's code)."""

    def __init__(self, latent_dims: int, nclass: int):
        super().__init__()
        self.dense = nn.Linear(latent_dims, nclass)
        nn.init.xavier_uniform_(self.dense.weight)
        nn.init.zeros_(self.dense.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.dense(z.flatten(1))


def autoencoder(config: ACAIConfig) -> tuple[Encoder, Decoder]:
    """The encoder and decoder of SPEC.md section 1 for `config`, built in that order (the order of
    the random init draws)."""
    scales = config.scales
    return (Encoder(config.colors, config.depth, scales, config.latent),
            Decoder(config.latent, config.depth, scales, config.colors))


def build_networks(config: ACAIConfig) -> dict[str, nn.Module]:
    """The four networks of one ACAI model, freshly initialised (use torch.manual_seed first)."""
    encoder, decoder = autoencoder(config)
    return dict(encoder=encoder, decoder=decoder,
                critic=Critic(config.colors, config.critic_depth, config.scales, config.latent),
                probe=LinearProbe(config.latent_dims, config.nclass))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
