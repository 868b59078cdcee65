"""The networks' layers (SPEC.md section 1) as bench/ sees them, and one ACAI step's work: FLOPs
(analytic, from the layer shapes; equal to torch.utils.flop_counter on one step: tests/test_bench.py)
and a bytes-moved floor. bench/throughput.py's docstring gives the model in words.

    layers = network_layers(config)          # {"encoder": [Conv, ...], "decoder": [...], "critic": [...]}
    step_flops(config, batch)                # {"forward": F, "backward": B, "total": F + B}
    step_bytes(config, batch, act_bytes=2)   # bytes one step must move at least
"""
from __future__ import annotations

import dataclasses

from acai_fast import ACAIConfig


@dataclasses.dataclass(frozen=True)
class Conv:
    """One conv layer: cin -> cout, k x k, running at `size` x `size` (after any 2x upsample of its
    input), with its leaky ReLU, 2x2 average pool of the output, nearest 2x upsample of the input."""

    cin: int
    cout: int
    k: int
    size: int
    act: bool = True
    pool: bool = False
    up: bool = False

    def flops(self, n: int) -> int:
        """2 N H W Cout Cin k^2: one forward, or one input gradient, or one weight gradient."""
        return 2 * n * self.size ** 2 * self.cout * self.cin * self.k ** 2

    def in_elements(self, n: int) -> int:
        return n * self.cin * (self.size // 2 if self.up else self.size) ** 2

    def out_elements(self, n: int) -> int:
        return n * self.cout * (self.size // 2 if self.pool else self.size) ** 2

    @property
    def params(self) -> int:
        return self.cout * self.cin * self.k ** 2 + self.cout


def encoder_layers(colors: int, depth: int, scales: int, latent: int, size: int = 32) -> list[Conv]:
    layers = [Conv(colors, depth, 1, size, act=False)]
    cin = depth
    for s in range(scales):
        layers += [Conv(cin, depth << s, 3, size), Conv(depth << s, depth << s, 3, size, pool=True)]
        cin, size = depth << s, size // 2
    return layers + [Conv(cin, depth << scales, 3, size), Conv(depth << scales, latent, 3, size, act=False)]


def decoder_layers(latent: int, depth: int, scales: int, colors: int, width: int) -> list[Conv]:
    layers, cin, size, up = [], latent, width, False
    for s in range(scales - 1, -1, -1):
        size *= 2 if up else 1
        layers += [Conv(cin, depth << s, 3, size, up=up), Conv(depth << s, depth << s, 3, size)]
        cin, up = depth << s, True
    size *= 2 if up else 1
    return layers + [Conv(cin, depth, 3, size, up=up), Conv(depth, colors, 3, size, act=False)]


def network_layers(config: ACAIConfig) -> dict[str, list[Conv]]:
    c = config
    return dict(encoder=encoder_layers(c.colors, c.depth, c.scales, c.latent, c.image_size),
                decoder=decoder_layers(c.latent, c.depth, c.scales, c.colors, c.latent_width),
                critic=encoder_layers(c.colors, c.critic_depth, c.scales, c.latent, c.image_size))


def step_flops(config: ACAIConfig, batch: int) -> dict[str, int]:
    """FLOPs of one training step (bench/throughput.py's docstring): forward, backward and total."""
    nets, n = network_layers(config), batch

    def total(layers, images, skip_first=False):
        return sum(layer.flops(images) for layer in layers[1 if skip_first else 0:])

    enc, dec, crit = nets["encoder"], nets["decoder"], nets["critic"]
    probe = 2 * n * config.latent_dims * config.nclass
    forward = total(enc, n) + total(dec, 2 * n) + total(crit, 2 * n) + probe
    backward = (total(enc, n) + total(enc, n, skip_first=True)          # encoder: dW, dX
                + 2 * total(dec, 2 * n)                                  # decoder (ae; x_mix): dW, dX
                + total(crit, n)                                         # critic dX, autoencoder objective
                + total(crit, 2 * n) + total(crit, 2 * n, skip_first=True)  # critic objective: dW, dX
                + probe)                                                 # probe dW
    return dict(forward=forward, backward=backward, total=forward + backward)


def step_bytes(config: ACAIConfig, batch: int, act_bytes: int) -> int:
    """Bytes one step must move at least (the floor model of bench/throughput.py's docstring)."""
    nets, n = network_layers(config), batch

    def io(layers, images, skip_first=False):
        return sum(layer.in_elements(images) + layer.out_elements(images) for layer in layers[1 if skip_first else 0:])

    enc, dec, crit = nets["encoder"], nets["decoder"], nets["critic"]
    elements = (io(enc, n) + io(dec, 2 * n) + io(crit, 2 * n)                        # forward
                + io(enc, n) + io(enc, n, skip_first=True) + 2 * io(dec, 2 * n)       # ae backward
                + io(crit, n) + io(crit, 2 * n) + io(crit, 2 * n, skip_first=True))   # critic backward
    params = sum(layer.params for layers in nets.values() for layer in layers)
    params += config.latent_dims * config.nclass + config.nclass
    return elements * act_bytes + 32 * params
