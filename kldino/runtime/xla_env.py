"""The XLA flags kldino's entry points set before JAX creates its backend (kldino.main,
kldino.bench, tests/conftest.py), as big_vision sets its flags in its binaries: importing kldino
sets none.

XLA:CPU fuses reductions into its YNNPACK matmul fusions by default; a reduction in a matmul's
prologue is then recomputed for every tile of the matmul. The prototype weight norm
(kldino/models/head.py) fused that way took 3.8 s of a 5.3 s ViT-S/16 prior-pass batch. Without
reduction fusions (measured with `python -m kldino.bench --profile`, docs/performance.md): the
small224 step 7.9 -> 3.7 s, its prior pass 6.0 -> 24 images/s; the tiny32 step 3.70 -> 3.47 s.
"""
import os

_YNN_FUSION_FLAG = 'xla_cpu_experimental_ynn_fusion_type'


def set_xla_flags():
  """Add kldino's XLA flags to XLA_FLAGS, before JAX's first use; an explicit setting wins."""
  flags = os.environ.get('XLA_FLAGS', '')
  if _YNN_FUSION_FLAG not in flags:
    os.environ['XLA_FLAGS'] = f'{flags} --{_YNN_FUSION_FLAG}=-reduce'.strip()


def set_plan_flags(devices: int):
  """--mode=plan (kldino/modes/plan.py): `devices` simulated CPU devices (0: this machine's own
  devices), and
  XLA:CPU's memory-minimising scheduler. By default XLA:CPU schedules for concurrency, which
  keeps a rematerialised step's recomputed activations alive together, as no accelerator's
  compiler does: the ViT-B/16 step on v4-32 (64 images per device) with model.remat held 34.5
  GiB of temporaries per device that way and 16.6 GiB with this scheduler (docs/plan.md)."""
  flags = [
      os.environ.get('XLA_FLAGS', ''), '--xla_cpu_enable_concurrency_optimized_scheduler=false'
  ]
  if devices:  # the config's devices, simulated on this CPU
    flags.append(f'--xla_force_host_platform_device_count={devices}')
    os.environ['JAX_PLATFORMS'] = 'cpu'
  os.environ['XLA_FLAGS'] = ' '.join(flags).strip()
