"""Capture and replay of a step callable in CUDA graphs: one graph per key (batch shape).

The first `warmup` calls of each key run eagerly on a side stream (real steps: Triton compiles and
picks its kernel configurations, the reducing ops create their counters, the optimisers create
their state, all outside the capture); the next call captures the step on static input buffers,
and every call from then on copies its inputs in and replays. Random draws must come from
device-side state that the graph advances (the mix's Philox state; capturable Adam's step counts;
the torch.Generators passed as `generators`, registered with every graph so that their draws
advance on each replay, as the default CUDA generator's do).
Where capture fails, the key falls back to eager steps and the reason is logged once.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger("acai_fast")

WARMUP_STEPS = 3


class StepGraphs:
    """Runs `step(*inputs) -> dict of 0-d tensors` through per-key CUDA graphs on `device`."""

    def __init__(self, device, warmup: int = WARMUP_STEPS, generators=()):
        self.device = torch.device(device)
        self.warmup = int(warmup)
        self.generators = [g for g in generators if g.device.type == "cuda"]
        self._graphs: dict = {}  # key -> (CUDAGraph, static inputs, static outputs)
        self._eager_calls: dict = {}
        self.failed: dict = {}  # key -> why capture failed (those keys run eagerly)

    def run(self, key, step: Callable, *inputs):
        if key in self.failed:
            return step(*inputs)
        if key not in self._graphs:
            calls = self._eager_calls.get(key, 0)
            if calls < self.warmup:
                self._eager_calls[key] = calls + 1
                return self._side_stream(step, *inputs)
            try:
                self._capture(key, step, inputs)
            except Exception as exc:  # a capture error leaves the step unrun: run it eagerly
                self.failed[key] = f"{type(exc).__name__}: {exc}"
                log.warning("CUDA graph capture of the step %s failed, running it eagerly from now on: %s",
                            key, self.failed[key])
                torch.cuda.synchronize(self.device)
                return step(*inputs)
        graph, static_inputs, static_outputs = self._graphs[key]
        for static, value in zip(static_inputs, inputs):
            if static is not None:
                static.copy_(value)
        graph.replay()
        # One copy out of the graph's buffers (a stack), not one per value: the next replay rewrites them.
        return dict(zip(static_outputs, torch.stack(list(static_outputs.values())).unbind()))

    def _side_stream(self, step, *inputs):
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            out = step(*inputs)
        current.wait_stream(side)
        return out

    def _capture(self, key, step, inputs):
        static_inputs = tuple(
            v.clone(memory_format=torch.channels_last) if torch.is_tensor(v) and v.dim() == 4
            else (v.clone() if torch.is_tensor(v) else None) for v in inputs)
        graph = torch.cuda.CUDAGraph()
        for generator in self.generators:  # PyTorch >= 2.4; without it, capture of a draw fails (-> eager)
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            static_outputs = step(*static_inputs)
        self._graphs[key] = (graph, static_inputs, static_outputs)
        log.info("captured the training step %s in a CUDA graph", key)
