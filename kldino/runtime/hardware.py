"""The machine's numbers: the peak FLOP/s a figure's MFU is measured against, and the FLOPs of a
compiled program (XLA's cost analysis). The benchmark (kldino/tools/bench.py) and the plan
(kldino/modes/plan.py) share them.

The peak is, on CPU, the best float32 matmul rate measured now (so that MFU compares like with
like on this machine); on GPU/TPU, the device kind's dense bf16 peak from a table.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device, by jax's device_kind (vendor data sheets).
PEAK_FLOPS = {
    'NVIDIA H100 80GB HBM3': 989e12,
    'NVIDIA H100': 989e12,
    'NVIDIA H200': 989e12,
    'NVIDIA A100-SXM4-80GB': 312e12,
    'NVIDIA A100-SXM4-40GB': 312e12,
    'TPU v4': 275e12,
    'TPU v5 lite': 197e12,
    'TPU v5e': 197e12,
    'TPU v5p': 459e12,
    'TPU v6 lite': 918e12,
}


def measure_cpu_peak(size: int = 2048, repeats: int = 5) -> float:
  """The best float32 matmul FLOP/s of this machine, measured now."""
  a = jnp.asarray(np.random.default_rng(0).standard_normal((size, size)), jnp.float32)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float('inf')
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a, a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def device_peak() -> tuple[float, str]:
  device = jax.devices()[0]
  if device.platform == 'cpu':
    # This process's CPU devices (simulated ones included) share the machine's cores, and one
    # matmul on one device already uses all of them: the peak is the machine's, not per device.
    return measure_cpu_peak(), 'measured float32 matmul'
  kind = device.device_kind
  if kind not in PEAK_FLOPS:
    raise ValueError(f"no peak FLOP/s known for '{kind}': add it to PEAK_FLOPS in "
                     'kldino/runtime/hardware.py')
  return PEAK_FLOPS[kind] * jax.device_count(), f'{kind} bf16 table'


def program_flops(compiled, num_devices: int) -> float:
  """FLOPs of one call of a program partitioned over `num_devices`: XLA's cost analysis counts
  one device's part."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float(analysis['flops']) * num_devices
