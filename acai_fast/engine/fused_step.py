"""The ACAI step (SPEC.md section 2, models/acai.py) as one explicit schedule on the fused ops, with
no autograd over the networks: forward, then exactly the backward pieces some objective needs.

It runs an array of R same-shaped runs at once (one launch per layer serves them all; a single
run is the array of one, with the same launches). Every tensor below has a leading run axis and is
channels_last within each run; buffers are written in blocks of rows, never concatenated:
Forward (N images per run):
    z      = encoder(x)                                    -> zz[:, :N]      zz: (R, 2N, latent, w, w)
    z_mix  = mix(z) (alpha drawn on the device, Philox)     -> zz[:, N:]
    [ae; x_mix] = decoder(zz)                               -> xs[:, :2N]     xs: (R, 3N, colors, 32, 32)
    loss_ae, d_ae, x_real = image_loss(x, ae)               -> d_ae in g_dec[:, :N], x_real in xs[:, 2N:]
    [c_mix; c_real] = critic maps of xs[:, N:] = [x_mix; x_real]
    losses and map gradients = critic_loss(c_mix, c_real, alpha)
                                   -> g_crit = [d loss_disc; d loss_disc_real; d adv*loss_ae_disc]
Backward:
    critic: one input-gradient pass per block over the 3N gradient images (the critic objective's
        2N, then the autoencoder's N on x_mix, which reuse the forward's first N saved images), and
        one weight-gradient pass over the critic objective's 2N; the first block's input gradient
        only for the autoencoder's rows -> g_dec[:, N:] (d objective / d x_mix)
    decoder: input and weight gradients over the 2N images [ae; x_mix]
    mix backward: dz = g_z[:, :N] + mix_bwd(g_z[:, N:]) (accumulated in place: one launch)
    encoder: weight gradients, and input gradients where a block has a predecessor
    Within each chain, a block with a leaky ReLU and no pool receives dL/dz, not dL/dy: its
    successor's dx applies that ReLU's derivative in its epilogue (the sign read off its own saved
    input), so the block's dx and dW gather the gradient alone (`_links`).
    (The trainer then runs Adam, one launch over the flat buffers of both groups and the probe.)
The weight gradients are written, split reduction included, straight into the parameters' fp32
gradient views (acai_fast.parameters); the kernels read the weights channels_last, as the bf16
copy Adam writes (fp32 master weights for an fp32 step), and cast as they load, so no cast, copy,
concatenation or gradient sum runs as a launch of its own.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch

from ..ops.acai_loss import LOSS_NAMES, critic_loss_fwd_runs, image_loss_fwd_runs
from ..ops.conv_block import conv_bwd, conv_fwd, dw_counter_size, empty_activation
from ..ops.conv_configs import split_k_counter_size
from ..ops.mix import mix_bwd_runs, mix_fwd_runs
from ..profiling import phase


@dataclasses.dataclass
class _Saved:
    """What one block's backward needs from its forward: its input, and y or its sign map."""
    x: torch.Tensor
    y: torch.Tensor | None
    sign: torch.Tensor | None

    def rows(self, n: int) -> "_Saved":
        """The first n images of every run."""
        return _Saved(self.x[:, :n], self.y[:, :n] if self.y is not None else None,
                      self.sign[:, :n] if self.sign is not None else None)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """A (R, N, C, H, W) tensor, channels_last per run, as the (R, N, H, W, C) tensor it is (a view)."""
    return t.permute(0, 1, 3, 4, 2)


class FusedACAIStep:
    """The fused ACAI step of K runs of one model (one run is the array of one).

    model: the ACAI model (its block structure). params: the trainer's acai_fast.parameters.
        RunParameters: (K, ...) views over the runs of every parameter (conv weights channels_last
        per run) and of its gradient, which the kernels write in place; the kernels read the conv
        weights from `params.kernel_weights` (the bf16 copy Adam refreshes for a bf16 step, else
        the fp32 values) and the biases in fp32.
    alpha_states: the (K, 3) int64 Philox states.
    advweight, reg: floats, or fp32 (K,) tensors when they differ between runs.
    Every per-step input and output has a leading run axis.
    Holds the tile counters of the weight-gradient reductions and the loss reductions (zeroed once;
    every launch leaves them at zero)."""

    def __init__(self, model, *, dtype, device, alpha_states, advweight, reg, params):
        self.model = model
        self.config = model.config
        self.dtype = dtype
        self.device = torch.device(device)
        self.alpha_states = alpha_states
        self.runs = alpha_states.shape[0]
        self.advweight, self.reg = advweight, reg
        self.params = params
        # The mix/loss ops: CUDA or Triton on a GPU (their own choice); Triton (interpreted) on the CPU.
        self.op_backend = "auto" if self.device.type == "cuda" else "triton"
        # net -> its blocks as (parameter-name prefix, ConvBlock), in order
        self.nets = {net: [(f"{net}.blocks.{i}", b) for i, b in enumerate(getattr(model, net).blocks)]
                     for net in ("encoder", "decoder", "critic")}
        # block name -> the int32 tile counters of its in-launch reductions (dW's split reduction,
        # the forward's and dx's split-K), zeroed once: every launch leaves them at zero. One set
        # per block and kind, so that launches on the two streams never share one.
        self._counters = {}
        split_k = split_k_counter_size(self.runs)
        for blocks in self.nets.values():
            for name, b in blocks:
                cout, cin, k, _ = b.weight.shape
                zeros = lambda n: torch.zeros(n, dtype=torch.int32, device=self.device)  # noqa: E731
                self._counters[name] = dict(dw=zeros(dw_counter_size(k, cin, cout, runs=self.runs)),
                                            fwd=zeros(split_k), dx=zeros(split_k))
        self._loss_counters = torch.zeros(2, self.runs, dtype=torch.int32, device=self.device)
        self._side = _SideStreams(self.device)

    def _param(self, name: str, which: str):
        """(what the kernels read, the gradient) of a block's weight or bias, with the run axis."""
        key = f"{name}.{which}"
        value = self.params.kernel_weights[key] if which == "weight" else self.params.stacked[key]
        return value, self.params.stacked_grads[key]

    # ------------------------------------------------------------------ building blocks
    def _forward(self, blocks, h, out=None) -> tuple[torch.Tensor, list[_Saved]]:
        """Run a chain of blocks on h; the last block writes into `out` when given."""
        saved = []
        for i, (name, b) in enumerate(blocks):
            (w, _), (bias, _) = self._param(name, "weight"), self._param(name, "bias")
            y, sign = conv_fwd(h, w, bias, upsample_input=b.upsample_input, leaky_slope=b.leaky_slope,
                               pool_output=b.pool_output, out=out if i == len(blocks) - 1 else None,
                               out_dtype=self.dtype, counter=self._counters[name]["fwd"])
            saved.append(_Saved(h, y if b.leaky_slope is not None and not b.pool_output else None, sign))
            h = y
        return h, saved

    def _block_bwd(self, blocks, i, s: _Saved, g, *, need_dx=True, need_dw=True, dx_out=None):
        """The backward of block i of a chain (blocks: [(name, ConvBlock)] as in self.nets), g its
        gradient: dL/dz when its successor's dx wrote it so, else dL/dy (see `_links`). On a GPU the
        weight gradient runs on a side stream (only Adam waits for it), the input gradient on the
        current stream, where the next block's backward waits for it."""
        name, b = blocks[i]
        (w, dw), (_, db) = self._param(name, "weight"), self._param(name, "bias")
        links = _links(blocks, i)

        def run(dx_, dw_):
            out, _, _ = conv_bwd(g, s.x, w, s.y, s.sign, weight_dtype=dw.dtype, bias_dtype=db.dtype,
                                 upsample_input=b.upsample_input, leaky_slope=b.leaky_slope,
                                 pool_output=b.pool_output, need_dx=dx_, need_dw=dw_, need_db=dw_,
                                 dx_out=dx_out, dw_out=dw, db_out=db, dw_counter=self._counters[name]["dw"],
                                 dx_counter=self._counters[name]["dx"], **links)
            return out

        if not (need_dw and self._side.forks):
            return run(need_dx, need_dw)
        with self._side.fork(g, s.x, s.y, s.sign):
            run(False, True)
        return run(True, False) if need_dx else None

    def _backward(self, blocks, saved, g, *, first_dx=True):
        """Input and weight gradients of a chain from g = dL/d(output); the first block's input
        gradient only when `first_dx`."""
        for i in range(len(blocks) - 1, -1, -1):
            g = self._block_bwd(blocks, i, saved[i], g, need_dx=first_dx or i > 0)
        return g

    # ------------------------------------------------------------------ the step
    def gradients(self, x: torch.Tensor, terms=None):
        """The forward and backward of one ACAI step on x (K, N, colors, 32, 32) fp32, channels_last
        per run: writes every conv parameter's gradient (each objective's gradient into its own
        parameters) and returns ({loss_ae, loss_ae_disc, loss_disc, loss_disc_real} as (K,)
        tensors, z) with z the (K, N, latent, w, w) latent. The trainer then steps Adam.

        terms: None (the step), or a subset of LOSS_NAMES: the gradients of those terms of the two
        objectives alone (advweight * loss_ae_disc for "loss_ae_disc"), for tests that compare each
        term on its own scale: the upstream gradients of the other terms are zeroed after the
        forward (one extra launch each), the backward schedule is unchanged."""
        if terms is not None and not set(terms) <= set(LOSS_NAMES):
            raise ValueError(f"terms must be a subset of {LOSS_NAMES}, got {sorted(terms)}")
        with phase("forward"):  # profiler marks (acai_fast.profiling); nearly free otherwise
            f = self._forward_pass(x)
        if terms is not None:
            n = f.n
            upstream = dict(loss_ae=f.g_dec[:, :n], loss_disc=f.g_crit[:, :n],
                            loss_disc_real=f.g_crit[:, n:2 * n], loss_ae_disc=f.g_crit[:, 2 * n:])
            for name, g in upstream.items():
                if name not in terms:
                    g.zero_()
        with phase("backward"):
            self._backward_pass(f)
        losses = dict(loss_ae=f.img.loss_ae, loss_ae_disc=f.crit.loss_ae_disc, loss_disc=f.crit.loss_disc,
                      loss_disc_real=f.crit.loss_disc_real)
        return losses, f.zz[:, :f.n]

    def _forward_pass(self, x) -> "_Forward":
        cfg, dt, dev, ops, R = self.config, self.dtype, self.device, self.op_backend, self.runs
        n = x.shape[1]
        image = (cfg.colors, cfg.image_size, cfg.image_size)
        zz = empty_activation((2 * n, *cfg.latent_shape), dt, dev, R)
        _, enc_saved = self._forward(self.nets["encoder"], x, out=zz[:, :n])
        _, alpha = mix_fwd_runs(_nhwc(zz[:, :n]), self.alpha_states, out=_nhwc(zz[:, n:]), backend=ops)
        xs = empty_activation((3 * n, *image), dt, dev, R)
        _, dec_saved = self._forward(self.nets["decoder"], zz, out=xs[:, :2 * n])
        g_dec = empty_activation((2 * n, *image), dt, dev, R)
        img = image_loss_fwd_runs(_nhwc(x), _nhwc(xs[:, :n]), self.reg, d_ae_out=_nhwc(g_dec[:, :n]),
                                  x_real_out=_nhwc(xs[:, 2 * n:]), counter=self._loss_counters[0],
                                  backend=ops)
        maps, crit_saved = self._forward(self.nets["critic"], xs[:, n:])
        g_crit = empty_activation((3 * n, *maps.shape[-3:]), dt, dev, R)
        crit = critic_loss_fwd_runs(_nhwc(maps[:, :n]), _nhwc(maps[:, n:]), alpha, self.advweight,
                                    grads_out=(_nhwc(g_crit[:, 2 * n:]), _nhwc(g_crit[:, :n]),
                                               _nhwc(g_crit[:, n:2 * n])),
                                    counter=self._loss_counters[1], backend=ops)
        return _Forward(n, zz, alpha, img, crit, g_dec, g_crit, enc_saved, dec_saved, crit_saved)

    def _backward_pass(self, f: "_Forward") -> None:
        """The critic (both objectives' input gradients, the critic's weight gradients), then the
        decoder on [ae; x_mix], the mix, the encoder; the weight gradients join the current stream
        at the end (before the probe and Adam)."""
        n, critic = f.n, self.nets["critic"]
        g = f.g_crit
        for i in range(len(critic) - 1, 0, -1):
            g = self._block_bwd(critic, i, f.crit_saved[i], g)
        self._block_bwd(critic, 0, f.crit_saved[0], g[:, :2 * n], need_dx=False)
        self._block_bwd(critic, 0, f.crit_saved[0].rows(n), g[:, 2 * n:], need_dw=False,
                        dx_out=f.g_dec[:, n:])
        g_z = self._backward(self.nets["decoder"], f.dec_saved, f.g_dec)
        mix_bwd_runs(_nhwc(g_z[:, n:]), f.alpha, dz=_nhwc(g_z[:, :n]), backend=self.op_backend)
        self._backward(self.nets["encoder"], f.enc_saved, g_z[:, :n], first_dx=False)
        self._side.join()


def _hands_dz(block) -> bool:
    """Whether a block's dL/dz can be written by its successor's dx instead of its dL/dy: it has a
    leaky ReLU of slope >= 0 and no pool, so the sign of its z is the sign of its output y, which is
    the successor's saved input (conv_bwd's input_leaky_slope)."""
    return block.leaky_slope is not None and block.leaky_slope >= 0 and not block.pool_output


def _links(blocks, i) -> dict:
    """conv_bwd's chain-link arguments for block i of a chain whose backward runs from its last block
    down: block i's dx applies its predecessor's leaky-ReLU derivative when the predecessor qualifies
    (`_hands_dz`), writing the predecessor's dL/dz (input_leaky_slope), and block i reads its own
    gradient as dL/dz when it qualifies and has a successor in the chain (grad_is_dz), so neither its
    dx nor its dW gathers the sign of z. The last block of a chain gets dL/dy from outside (a loss,
    the mix, another chain) and reads it as such (in every network here it has no activation)."""
    prev = blocks[i - 1][1] if i > 0 else None
    return dict(grad_is_dz=i + 1 < len(blocks) and _hands_dz(blocks[i][1]),
                input_leaky_slope=prev.leaky_slope if prev is not None and _hands_dz(prev) else None)


SIDE_STREAMS = 2  # CUDA streams for the weight gradients; the dW launches take them in turn


class _SideStreams:
    """SIDE_STREAMS extra CUDA streams for the weight gradients, so that the chain of input
    gradients (each block's dx waits for the next block's) does not also wait for every dW, and the
    dW launches do not queue behind each other: with one side stream the dW chain (~0.29 ms of a
    modelled lines step) outlasts the dx chain and sets the step; with two it finishes soon after
    the last dx (`acai-fast profile --model h100 --preset lines`: 0.583 -> 0.535 ms). `fork(*tensors)`
    runs its body on the next side stream in turn, after everything queued so far on the current
    one, holding the tensors it reads until `join()`, which makes the current stream wait for every
    side stream (inside a CUDA-graph capture: forked and re-joined streams, as PyTorch requires). No
    streams on the CPU: the body runs in place and the order is the eager one. Nothing numerical
    changes: the same launches on the same inputs, each dW writing its own gradient with its own
    tile counters and workspace (allocated on its own stream), so no two side launches share memory.
    The cost model assigns the traced dW launches to the streams in the same turn
    (engine.launches.model_launches)."""

    def __init__(self, device: torch.device):
        self.streams = [torch.cuda.Stream(device) for _ in range(SIDE_STREAMS)] if device.type == "cuda" else []
        self._turn = 0
        self._held = []

    @property
    def forks(self) -> bool:
        return bool(self.streams)

    @contextlib.contextmanager
    def fork(self, *tensors):
        stream = self.streams[self._turn % len(self.streams)]
        self._turn += 1
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        self._held.extend(t for t in tensors if t is not None)
        with torch.cuda.stream(stream):
            yield

    def join(self) -> None:
        for stream in self.streams:
            torch.cuda.current_stream(stream.device).wait_stream(stream)
        self._turn = 0  # every step assigns its dW launches to the streams in the same order
        self._held.clear()  # freed after the waits: later work on this stream is ordered after them


@dataclasses.dataclass
class _Forward:
    """What the forward pass leaves for the backward pass and the step's outputs."""
    n: int
    zz: torch.Tensor
    alpha: torch.Tensor
    img: object
    crit: object
    g_dec: torch.Tensor
    g_crit: torch.Tensor
    enc_saved: list
    dec_saved: list
    crit_saved: list
