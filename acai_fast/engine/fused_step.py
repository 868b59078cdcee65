"""The ACAI step (SPEC.md section 2, models/acai.py) as one explicit schedule on the fused ops, with
no autograd over the networks: forward, then exactly the backward pieces some objective needs.

Forward (N images; buffers are channels_last, blocks of rows written in place, never concatenated):
    z      = encoder(x)                                    -> zz[:N]         zz: (2N, latent, w, w)
    z_mix  = mix(z) (alpha drawn on the device, Philox)     -> zz[N:]
    [ae; x_mix] = decoder(zz)                               -> xs[:2N]        xs: (3N, colors, 32, 32)
    loss_ae, d_ae, x_real = image_loss(x, ae)               -> d_ae in g_dec[:N], x_real in xs[2N:]
    [c_mix; c_real] = critic maps of xs[N:] = [x_mix; x_real]
    losses and map gradients = critic_loss(c_mix, c_real, alpha)
                                                  -> g_crit = [d loss_disc; d loss_disc_real; d adv*loss_ae_disc]
Backward:
    critic: one input-gradient pass per block over the 3N gradient images (the critic objective's
        2N, then the autoencoder's N on x_mix, which reuse the forward's first N saved images), and
        one weight-gradient pass over the critic objective's 2N; the first block's input gradient
        only for the autoencoder's rows -> g_dec[N:] (d objective / d x_mix)
    decoder: input and weight gradients over the 2N images [ae; x_mix]
    mix backward: dz = g_z[:N] + mix_bwd(g_z[N:]) (accumulated in place: one launch)
    encoder: weight gradients, and input gradients where a block has a predecessor
    (The trainer then runs Adam, PyTorch's fused one, over both groups and the probe.)
The weight gradients are written, split reduction included, straight into the parameters'
persistent fp32 .grad tensors; the kernels read the fp32 master weights (kept channels_last) and
cast them as they load, so no cast, copy, concatenation or gradient sum runs as a launch of its own.
"""
from __future__ import annotations

import dataclasses

import torch

from ..ops.acai_loss import critic_loss_fwd, image_loss_fwd
from ..ops.conv_block import conv_bwd, conv_fwd, dw_counter_size, output_shape
from ..ops.mix import mix_bwd, mix_fwd


@dataclasses.dataclass
class _Saved:
    """What one block's backward needs from its forward: its input, and y or its sign map."""
    x: torch.Tensor
    y: torch.Tensor | None
    sign: torch.Tensor | None


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """A channels_last (N, C, H, W) tensor as the contiguous (N, H, W, C) tensor it is (a view)."""
    return t.permute(0, 2, 3, 1)


def _cl_empty(shape, dtype, device) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device=device, memory_format=torch.channels_last)


class FusedACAIStep:
    """The fused ACAI step of one trainer (its model, optimisers, alpha state, dtype and device).

    Holds the per-trainer state the schedule needs: the tile counters of the weight-gradient
    reductions (zeroed once; every launch leaves them at zero). The conv weights are made
    channels_last here (same values; the optimisers' state follows the parameters' layout)."""

    def __init__(self, trainer):
        self.trainer = trainer
        model = trainer.model
        self.config = trainer.config
        self.dtype = trainer.dtype
        self.device = trainer.device
        # The mix/loss ops: CUDA or Triton on a GPU (their own choice); Triton (interpreted) on the CPU.
        self.op_backend = "auto" if self.device.type == "cuda" else "triton"
        self.encoder = list(model.encoder.blocks)
        self.decoder = list(model.decoder.blocks)
        self.critic = list(model.critic.blocks)
        self.reload_parameters()
        self._counters = {id(b): torch.zeros(dw_counter_size(b.weight.shape[2], b.weight.shape[1],
                                                             b.weight.shape[0]),
                                             dtype=torch.int32, device=self.device)
                          for b in self.encoder + self.decoder + self.critic}

    def reload_parameters(self) -> None:
        """Lay the conv weights out channels_last (Cin contiguous: coalesced weight tiles) and give
        every parameter a persistent .grad that the kernels write in place. Call after the
        parameters were replaced (a loaded checkpoint keeps the layout: load_state_dict copies)."""
        with torch.no_grad():
            for block in self.encoder + self.decoder + self.critic:
                w = block.weight
                if not w.is_contiguous(memory_format=torch.channels_last):
                    w.data = w.data.contiguous(memory_format=torch.channels_last)
                for p in (block.weight, block.bias):
                    if p.grad is None or p.grad.stride() != p.stride():
                        p.grad = torch.zeros_like(p)
        self.trainer.match_optimizer_layouts()

    # ------------------------------------------------------------------ building blocks
    def _forward(self, blocks, h, out=None) -> tuple[torch.Tensor, list[_Saved]]:
        """Run a chain of blocks on h; the last block writes into `out` when given."""
        saved = []
        for i, b in enumerate(blocks):
            y, sign = conv_fwd(h, b.weight, b.bias, upsample_input=b.upsample_input,
                               leaky_slope=b.leaky_slope, pool_output=b.pool_output,
                               out=out if i == len(blocks) - 1 else None, out_dtype=self.dtype)
            saved.append(_Saved(h, y if b.leaky_slope is not None and not b.pool_output else None, sign))
            h = y
        return h, saved

    def _block_bwd(self, b, s: _Saved, g, *, need_dx=True, need_dw=True, dx_out=None):
        dx, _, _ = conv_bwd(g, s.x, b.weight, s.y, s.sign, weight_dtype=b.weight.dtype,
                            bias_dtype=b.bias.dtype, upsample_input=b.upsample_input,
                            leaky_slope=b.leaky_slope, pool_output=b.pool_output, need_dx=need_dx,
                            need_dw=need_dw, need_db=need_dw, dx_out=dx_out,
                            dw_out=b.weight.grad, db_out=b.bias.grad, dw_counter=self._counters[id(b)])
        return dx

    def _backward(self, blocks, saved, g, *, first_dx=True, first_dx_out=None):
        """Input and weight gradients of a chain from g = dL/d(output); the first block's input
        gradient only when `first_dx` (into `first_dx_out` when given)."""
        for i in range(len(blocks) - 1, -1, -1):
            last = i == 0
            g = self._block_bwd(blocks[i], saved[i], g, need_dx=first_dx or not last,
                                dx_out=first_dx_out if last else None)
        return g

    # ------------------------------------------------------------------ the step
    def gradients(self, x: torch.Tensor):
        """The forward and backward of one ACAI step on x (N, colors, 32, 32) fp32: writes every conv
        parameter's .grad (each objective's gradient into its own parameters) and returns
        ({loss_ae, loss_ae_disc, loss_disc, loss_disc_real}, z) with z the (N, latent, w, w) latent.
        The trainer then steps Adam."""
        cfg, dt, dev, ops = self.config, self.dtype, self.device, self.op_backend
        n = x.shape[0]
        x = x.contiguous(memory_format=torch.channels_last)  # fp32: the loss target stays exact

        # ---- forward
        zz = _cl_empty((2 * n, *cfg.latent_shape), dt, dev)
        z, enc_saved = self._forward(self.encoder, x, out=zz[:n])
        _, alpha = mix_fwd(_nhwc(zz[:n]), state=self.trainer.alpha_state, out=_nhwc(zz[n:]), backend=ops)
        xs = _cl_empty((3 * n, cfg.colors, cfg.image_size, cfg.image_size), dt, dev)
        _, dec_saved = self._forward(self.decoder, zz, out=xs[:2 * n])
        g_dec = _cl_empty((2 * n, cfg.colors, cfg.image_size, cfg.image_size), dt, dev)
        image = image_loss_fwd(_nhwc(x), _nhwc(xs[:n]), cfg.reg, backend=ops,
                               d_ae_out=_nhwc(g_dec[:n]), x_real_out=_nhwc(xs[2 * n:]))
        maps, crit_saved = self._forward(self.critic, xs[n:])
        g_crit = _cl_empty((3 * n, *maps.shape[1:]), dt, dev)
        critic = critic_loss_fwd(_nhwc(maps[:n]), _nhwc(maps[n:]), alpha, cfg.advweight, backend=ops,
                                 grads_out=(_nhwc(g_crit[2 * n:]), _nhwc(g_crit[:n]), _nhwc(g_crit[n:2 * n])))

        # ---- backward: critic (both objectives' input gradients, the critic's weight gradients),
        # then the decoder on [ae; x_mix], the mix, the encoder
        g = g_crit
        for i in range(len(self.critic) - 1, 0, -1):
            g = self._block_bwd(self.critic[i], crit_saved[i], g)
        first, s0 = self.critic[0], crit_saved[0]
        self._block_bwd(first, s0, g[:2 * n], need_dx=False)
        self._block_bwd(first, _Saved(s0.x[:n], s0.y[:n] if s0.y is not None else None,
                                      s0.sign[:n] if s0.sign is not None else None),
                        g[2 * n:], need_dw=False, dx_out=g_dec[n:])
        g_z = self._backward(self.decoder, dec_saved, g_dec)
        mix_bwd(_nhwc(g_z[n:]), alpha, dz=_nhwc(g_z[:n]), backend=ops)
        self._backward(self.encoder, enc_saved, g_z[:n], first_dx=False)

        losses = dict(loss_ae=image.loss_ae, loss_ae_disc=critic.loss_ae_disc, loss_disc=critic.loss_disc,
                      loss_disc_real=critic.loss_disc_real)
        return losses, z
