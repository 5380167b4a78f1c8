"""kldino/runtime/hardware.py: a compiled program's FLOPs come from XLA's cost analysis, over all
devices."""
import jax
import jax.numpy as jnp
import pytest

from kldino.runtime import hardware


def test_flops_come_from_xla_cost_analysis_over_all_devices():
  # A matmul with its rows split over the 8 (simulated) devices: each device's program does 1/8.
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
  whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  compiled = jax.jit(lambda a, b: a @ b, in_shardings=(rows, whole),
                     out_shardings=rows).lower(jax.ShapeDtypeStruct((64, 32), jnp.float32),
                                               jax.ShapeDtypeStruct((32, 16),
                                                                    jnp.float32)).compile()
  assert jax.device_count() == 8
  assert hardware.program_flops(compiled, 8) == pytest.approx(2 * 64 * 32 * 16, rel=0.01)
