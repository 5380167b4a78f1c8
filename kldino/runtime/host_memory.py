"""Transparent huge pages for the host buffers XLA:CPU allocates on every call.

XLA:CPU takes each call's temporary buffer (the activations of a train step: 3.0 GB for the
`tiny32` benchmark) from malloc. glibc serves allocations above 32 MB with a fresh mmap and
unmaps them on free, so every step faulted its whole buffer in again, 4 KiB at a time: 750k
page faults and ~1.4 s of kernel time per `tiny32` step on 2 cores. glibc's tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35) makes malloc advise transparent huge pages on its
mappings: 2.4k faults per step, and the step ran 5.5 -> 4.9 s (docs/performance.md).

glibc reads tunables once, at process start, so the command-line entry points (kldino.main,
kldino.bench) re-execute themselves once with it set, before they load JAX. Nothing changes where
it would not help: not Linux glibc >= 2.35, transparent huge pages off ('never') or already on for
every mapping ('always'), or GLIBC_TUNABLES already naming the tunable (set
`GLIBC_TUNABLES=glibc.malloc.hugetlb=0` to opt out), and never in an interactive session.
"""
from __future__ import annotations

import os
import platform
import sys

from kldino.errors import ConfigError

TUNABLE = 'glibc.malloc.hugetlb'
_MIN_GLIBC = (2, 35)
_THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = _THP_MODE_FILE) -> str:
  """The kernel's transparent huge page mode ('always', 'madvise', 'never'), or '' if unknown."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ''
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else ''


def _glibc_version(libc: tuple[str, str]) -> tuple[int, ...]:
  name, version = libc
  if name != 'glibc':
    return ()
  try:
    return tuple(int(part) for part in version.split('.')[:2])
  except ValueError:
    return ()


def huge_page_environ(environ: dict[str, str], libc: tuple[str, str],
                      mode: str) -> dict[str, str] | None:
  """The environment to re-execute with, or None where re-executing would change nothing."""
  tunables = environ.get('GLIBC_TUNABLES', '')
  if _glibc_version(libc) < _MIN_GLIBC or mode != 'madvise' or TUNABLE in tunables:
    return None
  return {**environ, 'GLIBC_TUNABLES': ':'.join(filter(None, (tunables, f'{TUNABLE}=1')))}


def reexec_with_huge_pages() -> None:
  """Replaces this process by itself with `glibc.malloc.hugetlb=1`, where that helps. Call it at
  the start of a command's main(), before anything is printed or loaded."""
  if sys.flags.interactive or 'IPython' in sys.modules:
    return  # never replace an interactive session (a notebook kernel, python -i)
  environ = huge_page_environ(dict(os.environ), platform.libc_ver(), thp_mode())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, environ)


def available_bytes() -> int:
  """The memory this process may still take: the kernel's MemAvailable, within the cgroup's limit
  where there is one (a container's)."""
  available = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          available = int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    with open('/sys/fs/cgroup/memory.max') as f_max, open('/sys/fs/cgroup/memory.current') as f:
      limit = f_max.read().strip()
      if limit != 'max':
        available = min(available, int(limit) - int(f.read()))
  except (OSError, ValueError):
    pass
  return available


def check_fits(parts: dict[str, int], fix: str, available: int | None = None):
  """ConfigError naming the estimate, its parts and `fix` when `parts` (bytes) add up to more
  than the host's available memory."""
  available = available_bytes() if available is None else available
  needed = sum(parts.values())
  if needed > available:
    gib = lambda size: f'{size / 2**30:.1f} GiB'
    detail = ', '.join(f'{name} {gib(size)}' for name, size in parts.items())
    raise ConfigError(f'the run needs about {gib(needed)} of host memory ({detail}) and '
                      f'{gib(available)} are available: {fix}')
