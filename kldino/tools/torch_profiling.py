"""Where the PyTorch baseline's step spends its time (`python -m kldino.bench --baseline=torch
--profile=DIR`): torch.profiler's CPU events, broken down as kldino/tools/profiling.py breaks down
kldino's step, so that the two tables line up: by kind of work, by source line of
the baseline (kldino/tools/torch_baseline.py, torch_models.py), and the top ops.

Times are each ATen op's self time on the thread that called it (PyTorch's intra-op threads are
not traced separately), so `busy_ms` is about the step's wall time. A backward op counts for the
source line of the forward op that made its autograd node (the two share a sequence number), as
XLA's backward ops carry their forward op's frame.
"""
from __future__ import annotations

import collections
import os
import re

import torch

_MATMUL = {
    'mm', 'addmm', 'bmm', 'baddbmm', 'matmul', 'linear', 'conv2d', 'convolution', '_convolution',
    'mkldnn_convolution', 'convolution_backward', '_mkldnn_convolution'
}
_REDUCTION = {
    'sum', 'mean', 'norm', 'linalg_vector_norm', 'amax', 'max', 'min', 'var', 'std',
    '_foreach_norm', 'native_layer_norm', 'native_layer_norm_backward'
}
_LAYOUT = {
    'copy_', 'clone', 'contiguous', 'transpose', 'permute', 't', 'view', 'reshape', 'expand', 'cat',
    'stack', 'chunk', 'split', 'slice', 'select', 'narrow', 'unsqueeze', 'squeeze', 'as_strided',
    'empty', 'empty_like', 'empty_strided', 'zeros', 'zeros_like', 'fill_', 'zero_', 'to',
    '_to_copy', 'index', '_unsafe_view', 'flatten', 'detach', 'alias', 'unbind', 'new_empty',
    'resize_', 'set_'
}
_FRAME = re.compile(r'^(.*)\((\d+)\): (.*)$')
_BACKWARD = 'autograd::engine::evaluate_function: '
_BASELINE_FILES = ('torch_baseline.py', 'torch_models.py')
_MODULE = 'nn.Module: '
_PYTHON_EVENTS = (_MODULE, '<')  # nn.Module calls, <built-in function ...>; files: _FRAME


def category(op_name: str) -> str:
  """The kind of work of a profiler event, in kldino/tools/profiling.py's categories."""
  if not op_name.startswith('aten::'):
    return 'other'  # the autograd engine's and the optimizer's own bookkeeping
  name = op_name[len('aten::'):]
  if name in _MATMUL:
    return 'matmul'
  if name in _REDUCTION:
    return 'reduction'
  if name in _LAYOUT:
    return 'layout'
  return 'elementwise'


def _frame_source(event) -> str:
  """'Module FILE:LINE function' when the event is the profiler's record of a Python call into
  the baseline's files (kldino/tools/torch_baseline.py, torch_models.py; its module: the nn.Module
  call that encloses it), else ''."""
  match = _FRAME.match(event.name)
  file_name = os.path.basename(match.group(1)) if match else ''
  if file_name not in _BASELINE_FILES:
    return ''
  module, parent = '', event.cpu_parent
  while parent is not None and not module:
    if parent.name.startswith(_MODULE):
      module = parent.name[len(_MODULE):].rsplit('_', 1)[0] + ' '
    parent = parent.cpu_parent
  return f'{module}{file_name}:{match.group(2)} {match.group(3)}'


def _forward_source(event, forward: dict[int, str]) -> str:
  """The source an event counts for: its innermost kldino call, or in the backward pass that of
  the forward op whose autograd node it runs."""
  current = event
  while current is not None:
    if current.name.startswith(_BACKWARD):
      return forward.get(current.sequence_nr, '')
    if source := _frame_source(current):
      return source
    current = current.cpu_parent
  return ''


def _event_sources(events) -> dict[int, str]:
  """id(event) -> the source line it counts for (_forward_source). The forward op that made a
  node is the last op with its sequence number (the count moves on once the node is made)."""
  forward = {}
  for event in events:
    if event.sequence_nr >= 0 and event.name.startswith('aten::'):
      if source := _forward_source(event, {}):
        forward[event.sequence_nr] = source
  return {id(event): _forward_source(event, forward) for event in events}


def breakdown(events, calls: int, top: int = 12) -> dict:
  """Milliseconds per call by category, by source line (top N) and by op (top N), from the
  profiler's events: kldino/tools/profiling.py's `breakdown` keys."""
  sources = _event_sources(events)
  by_category, by_source, by_op = (collections.Counter() for _ in range(3))
  for event in events:
    if event.name.startswith(_PYTHON_EVENTS) or _FRAME.match(event.name):
      continue  # the Python tracer's call records: their time is the ops' inside them
    ms = event.self_cpu_time_total / 1e3 / calls
    by_category[category(event.name)] += ms
    by_source[sources[id(event)] or '(no source frame)'] += ms
    by_op[f'{event.name} ({category(event.name)})'] += ms
  return {
      'busy_ms': sum(by_category.values()),
      'by_category_ms': dict(by_category.most_common()),
      'by_source_ms': dict(by_source.most_common(top)),
      'top_ops_ms': dict(by_op.most_common(top)),
  }


def profile_calls(run, calls: int) -> dict:
  """Trace `calls` runs of run() (already warm) and break the CPU time down."""
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                              with_stack=True) as profiler:
    for _ in range(calls):
      run()
  return breakdown(profiler.events(), calls)
