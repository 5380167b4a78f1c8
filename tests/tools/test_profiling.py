"""The profile breakdown: HLO ops classified and attributed to kldino source, trace times mapped."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldino.tools import profiling
from kldino.models.layers import l2_normalize


def _compiled(fn, *args):
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, compiled.as_text()


def _matmul_tanh(a, b):
  return jnp.tanh(a @ b).sum(0)


def test_a_fused_matmul_is_matmul_work_and_elementwise_is_not():
  a = jnp.ones((64, 64))
  _, matmul_text = _compiled(_matmul_tanh, a, a)
  _, elementwise_text = _compiled(lambda x: jnp.exp(x) * 3.0 + 1.0, a)
  matmul_ops = profiling.hlo_ops(matmul_text)
  elementwise_ops = profiling.hlo_ops(elementwise_text)
  assert any(op.category == 'matmul' for op in matmul_ops.values())
  assert not any(op.category == 'matmul' for op in elementwise_ops.values())
  assert any(op.category == 'elementwise' for op in elementwise_ops.values())


def test_ops_are_attributed_to_the_kldino_line_that_emitted_them():
  _, text = _compiled(l2_normalize, jnp.ones((8, 16)))
  sources = {op.source for op in profiling.hlo_ops(text).values()} - {''}
  assert sources, 'no op was traced back to kldino/models/layers.py'
  assert all(
      source.startswith('models/layers.py:') and 'l2_normalize' in source for source in sources)


def test_breakdown_sums_per_call_and_ranks_the_slowest_first():
  ops = {
      'dot.1': profiling.HloOp('dot', 'matmul', 'models/vit.py:10 f'),
      'fusion.2': profiling.HloOp('fusion', 'elementwise', 'models/vit.py:20 g'),
      'copy.3': profiling.HloOp('copy', 'layout', '')
  }
  times_us = {'dot.1': 6000.0, 'fusion.2': 3000.0, 'copy.3': 1000.0, 'unknown.4': 2000.0}
  result = profiling.breakdown(times_us, ops, calls=2)
  np.testing.assert_allclose(result['busy_ms'], 6.0)  # 12 ms over 2 calls
  np.testing.assert_allclose(sum(result['by_category_ms'].values()), 6.0)
  assert result['by_category_ms'] == pytest.approx({
      'matmul': 3.0,
      'elementwise': 1.5,
      'layout': 0.5,
      'other': 1.0
  })
  assert list(result['by_category_ms'])[0] == 'matmul'
  assert result['by_source_ms']['(no source frame)'] == pytest.approx(1.5)
  assert list(result['top_ops_ms'])[0].startswith('dot.1 (matmul')


def test_a_traced_run_maps_every_timed_op_to_the_compiled_module(tmp_path):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((512, 512)), jnp.float32)
  compiled, text = _compiled(lambda x, y: jnp.tanh(x @ y), a, a)
  compiled(a, a).block_until_ready()
  result = profiling.profile_calls(lambda: compiled(a, a), 2, str(tmp_path), text)
  assert result['busy_ms'] > 0
  assert result['by_category_ms'].get('matmul', 0.0) > 0.5 * result['busy_ms']
  assert all('(' in name for name in result['top_ops_ms']), 'a traced op is not in the HLO text'


_HLO_FUSION_WITHOUT_FRAME = '''HloModule m

FileNames
1 "/src/kldino/models/vit.py"
2 "/usr/lib/python3.11/runpy.py"

FunctionNames
1 "MLP.__call__"
2 "_run_module"

FileLocations
1 {file_name_id=1 function_name_id=1 line=48 end_line=48 column=4 end_column=9}
2 {file_name_id=2 function_name_id=2 line=7 end_line=7 column=0 end_column=1}

StackFrames
1 {file_location_id=2 parent_frame_id=1}
2 {file_location_id=1 parent_frame_id=1}
3 {file_location_id=2 parent_frame_id=2}

%fused_computation (param_0: f32[4,4], param_1: f32[4,4]) -> f32[4,4] {
  %param_0 = f32[4,4]{1,0} parameter(0)
  %param_1 = f32[4,4]{1,0} parameter(1)
  %add.1 = f32[4,4]{1,0} add(%param_0, %param_1), metadata={op_name="add" stack_frame_id=1}
  ROOT %dot.2 = f32[4,4]{1,0} dot(%add.1, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="dot_general" stack_frame_id=3}
}

ENTRY %main (a: f32[4,4], b: f32[4,4]) -> f32[4,4] {
  %a = f32[4,4]{1,0} parameter(0)
  %b = f32[4,4]{1,0} parameter(1)
  ROOT %ynn_fusion = f32[4,4]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_computation
}
'''


def test_a_fusion_without_a_frame_takes_its_dots_frame():
  ops = profiling.hlo_ops(_HLO_FUSION_WITHOUT_FRAME)
  assert ops['ynn_fusion'].category == 'matmul'
  # frame 3 is runpy called from vit.py:48; frame 1 (the add) has no kldino frame at all
  assert ops['ynn_fusion'].source == 'models/vit.py:48 MLP.__call__'
  assert ops['add.1'].source == 'lib/python3.11/runpy.py:7 _run_module'
  assert ops['add.1'].category == 'elementwise'
