"""What a bench preset's compiled train step costs the host beyond its own work: CPU time in the
kernel, minor page faults and the process's resident memory, call by call.

    GLIBC_TUNABLES=... python benchmarks/step_host_memory.py [--preset=tiny32] [--calls=8]

XLA:CPU takes each call's temporary buffer from malloc and frees it when the call ends; whether
the allocator maps it afresh (and the kernel zero-fills it) every call depends on glibc's
tunables, which glibc reads at process start, so this script does not re-execute itself as
kldino.bench does (kldino/runtime/host_memory.py): set GLIBC_TUNABLES on its command line. It times
`--calls` calls waiting for each ('blocking'), then `--calls` calls dispatched back to back as the
training loop and kldino.bench issue them ('async'), and prints one JSON line per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

from kldino.runtime import xla_env


def _resident_gb() -> float:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') / 1e9


def _usage() -> tuple[float, float, float, int]:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return time.perf_counter(), usage.ru_utime, usage.ru_stime, usage.ru_minflt


def _per_call(before, after, calls: int) -> dict:
  wall, user, system, faults = (b - a for a, b in zip(before, after))
  return {
      'wall_ms': 1e3 * wall / calls,
      'user_cpu_ms': 1e3 * user / calls,
      'system_cpu_ms': 1e3 * system / calls,
      'minor_faults': faults / calls,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--preset', default='tiny32')
  parser.add_argument('--calls', type=int, default=8)
  args = parser.parse_args()
  if args.calls < 1:
    parser.error(f'--calls={args.calls} must be >= 1')
  xla_env.set_xla_flags()  # before JAX starts, as kldino.bench
  import jax  # pylint: disable=g-import-not-at-top
  from kldino.tools import bench
  from kldino.core import sharding  # pylint: disable=g-import-not-at-top

  config, channels = bench.preset_config(args.preset)
  run = bench.bench_train_step(config, channels, sharding.make_mesh(config.mesh), 1)['run']
  for mode in ('blocking', 'async'):
    before = _usage()
    for _ in range(args.calls):
      last = run()
      if mode == 'blocking':
        jax.block_until_ready(last)
    jax.block_until_ready(last)
    print(json.dumps({
        'preset': args.preset,
        'mode': mode,
        'calls': args.calls,
        **_per_call(before, _usage(), args.calls),
        'resident_gb_after': _resident_gb(),
        'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
    }),
          flush=True)


if __name__ == '__main__':
  main()
