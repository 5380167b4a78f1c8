"""kldino's GELU (models/layers.py:gelu), forward and backward, under XLA:CPU against PyTorch's
(ATen) at one MLP activation's shape, outside any train step.

    python benchmarks/gelu_xla_vs_aten.py [--rows=14848] [--width=768] [--calls=20]

The default shape is the `tiny32` preset's student MLP activation (2 x 64 crops of 65 tokens and
6 x 64 of 17, hidden width 768). Needs the torch extra. Prints one JSON line with both times in
ms per call (after one warm-up call each) and the XLA flags in effect (kldino/runtime/xla_env.py's).
"""
from __future__ import annotations

import argparse
import json
import os
import time

from kldino.runtime import xla_env


def _ms_per_call(run, calls: int) -> float:
  run()
  start = time.perf_counter()
  for _ in range(calls):
    run()
  return 1e3 * (time.perf_counter() - start) / calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rows', type=int, default=14848)
  parser.add_argument('--width', type=int, default=768)
  parser.add_argument('--calls', type=int, default=20)
  args = parser.parse_args()
  xla_env.set_xla_flags()  # before JAX starts, as kldino.bench
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from kldino.models import layers  # pylint: disable=g-import-not-at-top

  activations = np.random.RandomState(0).randn(args.rows, args.width).astype(np.float32)
  upstream = np.random.RandomState(1).randn(args.rows, args.width).astype(np.float32)

  @jax.jit
  def xla_forward_backward(x, grad):
    outputs, vjp = jax.vjp(layers.gelu, x)
    return outputs, vjp(grad)[0]

  x, grad = jax.device_put(activations), jax.device_put(upstream)
  xla_ms = _ms_per_call(lambda: jax.block_until_ready(xla_forward_backward(x, grad)), args.calls)

  torch_x = torch.from_numpy(activations).requires_grad_(True)
  torch_grad = torch.from_numpy(upstream)

  def aten_forward_backward():
    outputs = torch.nn.functional.gelu(torch_x)
    return outputs, torch.autograd.grad(outputs, torch_x, torch_grad)[0]

  aten_ms = _ms_per_call(aten_forward_backward, args.calls)
  print(
      json.dumps({
          'shape': [args.rows, args.width],
          'xla_ms': xla_ms,
          'aten_ms': aten_ms,
          'aten_threads': torch.get_num_threads(),
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
      }))


if __name__ == '__main__':
  main()
