"""The `tiny32` step's matmul shapes under XLA:CPU (kldino/runtime/xla_env.py's flags) against
PyTorch's (ATen) `torch.mm`, each alone, outside any train step.

    python benchmarks/matmul_xla_vs_aten.py [--calls=10]

The shapes are the ViT-Ti/4 student's (14848 tokens: 2 x 64 crops of 65 tokens and 6 x 64 of 17;
width 192, MLP 768, qkv 576) forward and weight-gradient products, and the DINO head's (512
crops, hidden 2048, bottleneck 256, K 4096), with a square 2048 product for reference. Needs the
torch extra. Prints one JSON line: ms per call of each side (after two warm-up calls), by shape.

The weight gradients are also timed in the form the step's backward pass has them, the
activations [tokens, width] with the token axis contracted (`xla_step_form_ms`: XLA:CPU gives
that dot to Eigen, not to YNNPACK; ATen multiplies the transposed view, `aten_step_form_ms`).
"""
from __future__ import annotations

import argparse
import json
import time

from kldino.runtime import xla_env

# name -> (rows, contraction, columns) of [rows, contraction] @ [contraction, columns]
SHAPES = {
    'fc1 forward': (14848, 192, 768),
    'fc2 forward': (14848, 768, 192),
    'qkv forward': (14848, 192, 576),
    'fc1 weight gradient': (192, 14848, 768),
    'fc2 weight gradient': (768, 14848, 192),
    'qkv weight gradient': (192, 14848, 576),
    'head hidden layer': (512, 2048, 2048),
    'prototypes': (512, 256, 4096),
    'square 2048': (2048, 2048, 2048),
}


def _ms_per_call(run, calls: int) -> float:
  run()
  run()
  start = time.perf_counter()
  for _ in range(calls):
    run()
  return 1e3 * (time.perf_counter() - start) / calls


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--calls', type=int, default=10)
  args = parser.parse_args()
  xla_env.set_xla_flags()  # before JAX starts, as kldino.bench
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  matmul = jax.jit(lambda left, right: left @ right)
  # [tokens, rows]^T @ [tokens, columns], as the backward pass of a linear layer has it.
  token_contraction = jax.jit(lambda left, right: jax.numpy.einsum('tr,tc->rc', left, right))
  rng = np.random.default_rng(0)
  results = {}
  for name, (rows, contraction, columns) in SHAPES.items():
    left = rng.standard_normal((rows, contraction), np.float32)
    right = rng.standard_normal((contraction, columns), np.float32)
    xla_left, xla_right = jax.device_put(left), jax.device_put(right)
    aten_left, aten_right = torch.from_numpy(left), torch.from_numpy(right)
    results[name] = {
        'xla_ms':
            _ms_per_call(lambda: jax.block_until_ready(matmul(xla_left, xla_right)), args.calls),
        'aten_ms':
            _ms_per_call(lambda: torch.mm(aten_left, aten_right), args.calls),
    }
    if name.endswith('weight gradient'):
      tokens_first = np.ascontiguousarray(left.T)
      xla_tokens_first, aten_tokens_first = jax.device_put(tokens_first), torch.from_numpy(
          tokens_first)
      results[name]['xla_step_form_ms'] = _ms_per_call(
          lambda: jax.block_until_ready(token_contraction(xla_tokens_first, xla_right)), args.calls)
      results[name]['aten_step_form_ms'] = _ms_per_call(
          lambda: torch.mm(aten_tokens_first.t(), aten_right), args.calls)
  print(json.dumps({'torch_threads': torch.get_num_threads(), 'ms_per_call': results}))


if __name__ == '__main__':
  main()
