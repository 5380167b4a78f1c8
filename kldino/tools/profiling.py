"""Where a compiled program spends its time: the profiler's per-op device times, mapped back to
the HLO ops (what kind of work) and to the kldino source lines that emitted them.

    python -m kldino.bench --preset=tiny32 --profile=/tmp/tiny32_profile

The runtime's trace names each executed op (a thunk on CPU, a kernel on GPU/TPU) after its HLO
instruction; the compiled HLO text gives that instruction's opcode, the computation a fusion
calls (a fusion that contains a dot is matmul work, with its fused prologue and epilogue), and
its stack frame. Times are summed over a thread's events, so ops that ran in parallel on several
threads count once per thread: `busy_ms` against the step time shows how parallel the step was.
"""
from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re

import jax

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([a-z][\w\-]*)\(')
_CALLS = re.compile(r'calls=%?([\w.\-]+)')
_FRAME = re.compile(r'stack_frame_id=(\d+)')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$')
_TABLE_ROW = re.compile(r'^(\d+) (.*)$')
_MATMUL_OPCODES = ('dot', 'convolution')
_LAYOUT_OPCODES = ('copy', 'transpose', 'bitcast', 'reshape', 'broadcast', 'slice', 'dynamic-slice',
                   'dynamic-update-slice', 'concatenate', 'pad', 'gather', 'scatter', 'iota',
                   'parameter', 'constant', 'tuple', 'get-tuple-element')
_COLLECTIVE_OPCODES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                       'collective-permute')


@dataclasses.dataclass(frozen=True)
class HloOp:
  opcode: str
  category: str  # matmul | reduction | elementwise | layout | collective | other
  source: str  # 'file.py:line function' of the innermost kldino frame (else of the innermost
  # frame, its path shortened), or '' where the op has no frame


def _parse_tables(hlo_text: str) -> dict[str, dict[int, str]]:
  """The FileNames / FunctionNames / FileLocations / StackFrames tables of the HLO text."""
  tables, current = {}, None
  for line in hlo_text.splitlines():
    if line in ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames'):
      current = tables.setdefault(line, {})
    elif current is not None and (row := _TABLE_ROW.match(line)):
      current[int(row.group(1))] = row.group(2)
    elif not line.strip() or line.startswith(('%', 'ENTRY')):
      current = None
  return tables


def _frame_sources(tables: dict) -> dict[int, str]:
  """stack_frame_id -> the innermost frame in a kldino file, walking up the parents, or else the
  innermost frame."""
  files, functions = tables.get('FileNames', {}), tables.get('FunctionNames', {})
  locations, frames = tables.get('FileLocations', {}), tables.get('StackFrames', {})

  def location(location_id):
    fields = dict(re.findall(r'(\w+)=(\d+)', locations.get(location_id, '')))
    file_name = files.get(int(fields.get('file_name_id', -1)), '').strip('"')
    function = functions.get(int(fields.get('function_name_id', -1)), '').strip('"')
    return file_name, fields.get('line', '?'), function

  sources = {}
  for frame_id in frames:
    current, seen, innermost = frame_id, set(), None
    while current in frames and current not in seen:
      seen.add(current)
      fields = dict(re.findall(r'(\w+)=(\d+)', frames[current]))
      file_name, line, function = location(int(fields.get('file_location_id', -1)))
      innermost = innermost or (file_name, line, function)
      if f'{os.sep}kldino{os.sep}' in file_name:
        sources[
            frame_id] = f'{file_name.rsplit(os.sep + "kldino" + os.sep, 1)[1]}:{line} {function}'
        break
      current = int(fields.get('parent_frame_id', -1))
    else:
      # JAX can cut a stack short (a library layer's op has only the library's frame): the
      # innermost frame's last path parts still say which layer it was.
      if innermost and innermost[0]:
        file_name, line, function = innermost
        sources[frame_id] = f'{"/".join(file_name.split(os.sep)[-3:])}:{line} {function}'
  return sources


def _category(opcode: str, called_opcodes: set[str]) -> str:
  opcodes = called_opcodes or {opcode}
  if opcodes & set(_MATMUL_OPCODES):
    return 'matmul'
  if opcodes & set(_COLLECTIVE_OPCODES):
    return 'collective'
  if 'reduce' in opcodes or 'reduce-window' in opcodes:
    return 'reduction'
  if opcodes <= set(_LAYOUT_OPCODES):
    return 'layout'
  if opcode in ('custom-call', 'while', 'conditional', 'call', 'sort', 'rng-bit-generator'):
    return 'other'
  return 'elementwise'


def hlo_ops(hlo_text: str) -> dict[str, HloOp]:
  """Instruction name -> HloOp, for every instruction of the compiled module's text. A fusion
  with no frame of its own (the CPU backend's matmul fusions) takes the frame of the dot or
  convolution it contains, or else of its first instruction that has one."""
  sources = _frame_sources(_parse_tables(hlo_text))
  computation_opcodes = collections.defaultdict(set)
  computation_sources = collections.defaultdict(list)  # (is matmul, source), in order
  instructions, computation = [], None
  for line in hlo_text.splitlines():
    if (header := _COMPUTATION.match(line)) and ' = ' not in line:
      computation = header.group(1)
    elif match := _INSTRUCTION.match(line):
      name, opcode = match.groups()
      calls, frame = _CALLS.search(line), _FRAME.search(line)
      source = sources.get(int(frame.group(1)), '') if frame else ''
      computation_opcodes[computation].add(opcode)
      if source:
        computation_sources[computation].append((opcode in _MATMUL_OPCODES, source))
      instructions.append((name, opcode, calls.group(1) if calls else None, source))
  ops = {}
  for name, opcode, called, source in instructions:
    is_fusion = opcode == 'fusion'
    called_opcodes = computation_opcodes.get(called, set()) - {'parameter'} if is_fusion else set()
    if is_fusion and not source and (called_sources := computation_sources.get(called)):
      source = next((s for is_matmul, s in called_sources if is_matmul), called_sources[0][1])
    ops[name] = HloOp(opcode, _category(opcode, called_opcodes), source)
  return ops


def _perfetto_events(trace_dir: str) -> list[dict]:
  paths = sorted(glob.glob(os.path.join(trace_dir, '**', 'perfetto_trace.json.gz'), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f'no perfetto_trace.json.gz under {trace_dir}: the profiler wrote '
                            'no trace (is another profile running?)')
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  return trace['traceEvents'] if isinstance(trace, dict) else trace


def op_times_us(trace_dir: str) -> dict[str, float]:
  """HLO instruction name -> device microseconds summed over the trace's events."""
  times = collections.defaultdict(float)
  for event in _perfetto_events(trace_dir):
    args = event.get('args') or {}
    if event.get('ph') == 'X' and 'hlo_op' in args:
      times[args['hlo_op']] += float(event.get('dur', 0.0))
  return dict(times)


def breakdown(times_us: dict[str, float], ops: dict[str, HloOp], calls: int, top: int = 12) -> dict:
  """Milliseconds per call by category, by kldino source line (top N) and by op (top N)."""
  per_call = {name: us / 1e3 / calls for name, us in times_us.items()}
  by_category, by_source = collections.Counter(), collections.Counter()
  for name, ms in per_call.items():
    op = ops.get(name, HloOp('?', 'other', ''))
    by_category[op.category] += ms
    by_source[op.source or '(no source frame)'] += ms
  top_ops = sorted(per_call.items(), key=lambda item: -item[1])[:top]
  return {
      'busy_ms': sum(per_call.values()),
      'by_category_ms': dict(by_category.most_common()),
      'by_source_ms': dict(by_source.most_common(top)),
      'top_ops_ms': {
          f'{name} ({ops[name].category}, {ops[name].source or "-"})' if name in ops else name: ms
          for name, ms in top_ops
      },
  }


def profile_calls(run, calls: int, trace_dir: str, hlo_text: str) -> dict:
  """Trace `calls` runs of run() (already warm; returns an array to wait on) and break the
  device time down (see `breakdown`)."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    for _ in range(calls):
      last = run()
    jax.block_until_ready(last)
  return breakdown(op_times_us(trace_dir), hlo_ops(hlo_text), calls)
