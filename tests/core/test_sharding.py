"""kldino/core/sharding.py: prefetched global batches are the local batches, in order, laid out on
the mesh. (The step on every mesh: tests/core/test_step.py.)"""
import numpy as np

from kldino.core import sharding
from tests.helpers import tiny_config


def test_prefetched_global_batches_are_the_batches_in_order():
  mesh = sharding.make_mesh(tiny_config().mesh)
  local = [{'x': np.full((8, 2), index, np.float32)} for index in range(5)]
  fetched = list(sharding.prefetch_global_batches(iter(local), mesh, depth=2))
  assert len(fetched) == 5
  for index, batch in enumerate(fetched):
    assert batch['x'].sharding == sharding.batch_sharding(mesh)
    np.testing.assert_array_equal(np.asarray(batch['x']), local[index]['x'])
