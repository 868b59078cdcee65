"""ACAIConfig presets and validation; the networks' parameter counts, shapes and init (SPEC 1, 3)."""
import math

import pytest
import torch

from acai_fast.config import PRESETS, ACAIConfig
from acai_fast.networks import ConvBlock, build_networks, count_parameters, he_modified_std

# SPEC.md section 1: (encoder, decoder, critic) parameter counts.
PARAM_COUNTS = {
    "lines": (627_472, 313_985, 627_472),
    "mnist32": (150_146, 75_265, 150_146),
    "mnist256": (166_288, 83_329, 166_288),
    "svhn256": (2_434_704, 1_219_203, 2_434_704),
    "cifar256": (2_434_704, 1_219_203, 2_434_704),
    "cifar1024": (2_655_936, 1_329_795, 2_655_936),
}
# SPEC.md section 3: latent dims.
LATENT_DIMS = {"lines": 64, "mnist32": 32, "mnist256": 256, "svhn32": 32, "svhn256": 256,
               "celeba32": 32, "celeba256": 256, "cifar256": 256, "cifar1024": 1024}


@pytest.mark.parametrize("preset", sorted(PARAM_COUNTS))
def test_parameter_counts(preset):
    nets = build_networks(ACAIConfig.preset(preset))
    got = tuple(count_parameters(nets[k]) for k in ("encoder", "decoder", "critic"))
    assert got == PARAM_COUNTS[preset]


@pytest.mark.parametrize("preset", PRESETS)
def test_shapes_and_latent_dims(preset):
    cfg = ACAIConfig.preset(preset)
    assert cfg.latent_dims == LATENT_DIMS[preset]
    nets = build_networks(cfg)
    x = torch.randn(3, cfg.colors, 32, 32)
    z = nets["encoder"](x)
    assert z.shape == (3, *cfg.latent_shape)
    assert nets["decoder"](z).shape == x.shape
    assert nets["critic"](x).shape == (3,)
    assert nets["probe"](z).shape == (3, cfg.nclass)


def test_svhn_and_celeba_share_the_cifar256_networks():
    def counts(preset):
        nets = build_networks(ACAIConfig.preset(preset))
        return [count_parameters(nets[k]) for k in ("encoder", "decoder", "critic")]

    assert counts("svhn256") == counts("celeba256") == counts("cifar256")
    assert ACAIConfig.preset("celeba32").nclass == 1


def test_layer_sequence_lines():
    """The encoder/decoder layer order of SPEC 1: where the pools and upsamples sit."""
    nets = build_networks(ACAIConfig.preset("lines"))
    enc = [(b.weight.shape[:3], b.leaky_slope is not None, b.pool_output) for b in nets["encoder"].blocks]
    assert enc[0] == ((16, 1, 1), False, False)  # 1x1 conv, no activation
    assert [p for *_, p in enc] == [False, False, True, False, True, False, True, False, True, False, False]
    assert enc[-1] == ((16, 256, 3), False, False)  # conv -> latent, no activation
    dec = [(b.weight.shape[:2], b.upsample_input, b.leaky_slope is not None) for b in nets["decoder"].blocks]
    assert dec[0] == ((128, 16), False, True)
    assert [u for _, u, _ in dec] == [False, False, True, False, True, False, True, False, True, False]
    assert dec[-1] == ((1, 16), False, False)  # conv -> colors, no activation, no tanh


def test_init_statistics():
    torch.manual_seed(0)
    nets = build_networks(ACAIConfig.preset("cifar1024"))
    checked = 0
    for name in ("encoder", "decoder", "critic"):
        for block in nets[name].blocks:
            cout, cin, k, _ = block.weight.shape
            expected = 1 / math.sqrt((1 + 0.2 ** 2) * k * k * cin)
            assert he_modified_std(k * k * cin) == pytest.approx(expected)
            assert torch.all(block.bias == 0)
            if block.weight.numel() >= 2000:  # enough samples for a 5% check
                std = block.weight.std().item()
                assert abs(std / expected - 1) < 0.05, (name, tuple(block.weight.shape), std, expected)
                assert abs(block.weight.mean().item()) < 0.1 * expected
                checked += 1
    assert checked >= 20


def test_init_fan_in_uses_input_channels_and_kernel():
    """A wide-output, narrow-input conv must get the large std of its small fan-in (not fan-out)."""
    torch.manual_seed(0)
    block = ConvBlock(2, 512, 3, act=True)
    assert block.weight.std().item() == pytest.approx(1 / math.sqrt(1.04 * 18), rel=0.05)


def test_preset_errors():
    with pytest.raises(ValueError, match="valid presets: lines, mnist32"):
        ACAIConfig.preset("mnist")
    with pytest.raises(ValueError, match="latent_width"):
        ACAIConfig(latent_width=3)
    with pytest.raises(ValueError, match="latent_width"):
        ACAIConfig(latent_width=32)
    with pytest.raises(ValueError, match="depth"):
        ACAIConfig(depth=0)
    with pytest.raises(ValueError, match="advweight"):
        ACAIConfig(advweight=float("nan"))
    with pytest.raises(ValueError, match="unknown ACAIConfig fields"):
        ACAIConfig.preset("lines", widht=3)
    assert ACAIConfig.preset("lines", batch=32).batch == 32
    assert ACAIConfig.preset("cifar1024").scales == 3 and ACAIConfig.preset("lines").scales == 4
