"""The profile breakdown: HLO ops classified and attributed to kldino source, trace times mapped."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kldino import profiling
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
  assert all(source.startswith('models/layers.py:') and 'l2_normalize' in source
             for source in sources)


def test_breakdown_sums_per_call_and_ranks_the_slowest_first():
  ops = {'dot.1': profiling.HloOp('dot', 'matmul', 'models/vit.py:10 f'),
         'fusion.2': profiling.HloOp('fusion', 'elementwise', 'models/vit.py:20 g'),
         'copy.3': profiling.HloOp('copy', 'layout', '')}
  times_us = {'dot.1': 6000.0, 'fusion.2': 3000.0, 'copy.3': 1000.0, 'unknown.4': 2000.0}
  result = profiling.breakdown(times_us, ops, calls=2)
  np.testing.assert_allclose(result['busy_ms'], 6.0)  # 12 ms over 2 calls
  np.testing.assert_allclose(sum(result['by_category_ms'].values()), 6.0)
  assert result['by_category_ms'] == pytest.approx(
      {'matmul': 3.0, 'elementwise': 1.5, 'layout': 0.5, 'other': 1.0})
  assert list(result['by_category_ms'])[0] == 'matmul'
  assert result['by_source_ms']['(no kldino frame)'] == pytest.approx(1.5)
  assert list(result['top_ops_ms'])[0].startswith('dot.1 (matmul')


def test_a_traced_run_maps_every_timed_op_to_the_compiled_module(tmp_path):
  a = jnp.asarray(np.random.default_rng(0).standard_normal((256, 256)), jnp.float32)
  compiled, text = _compiled(_matmul_tanh, a, a)
  compiled(a, a).block_until_ready()
  result = profiling.profile_calls(lambda: compiled(a, a), 2, str(tmp_path), text)
  assert result['busy_ms'] > 0
  assert result['by_category_ms'].get('matmul', 0.0) > 0.5 * result['busy_ms']
  assert all('(' in name for name in result['top_ops_ms']), 'a traced op is not in the HLO text'
