"""kldino/models/forward.py on pure parameters: bfloat16 compute keeps float32 features,
parameters and gradients. (Its features against DINO's: tests/models/test_vit.py.)"""
import jax
import jax.numpy as jnp
import numpy as np

from kldino.core import optim
from kldino.core import schedules
from kldino.core import step
from kldino.models import forward
from tests.helpers import tiny_config


def test_bf16_compute_keeps_float32_parameters_and_gradients():
  config = tiny_config()
  graphdef, _ = step.build_graphdef(config, 1)
  config_bf16 = tiny_config(compute_dtype='bfloat16')
  graphdef_bf16, _ = step.build_graphdef(config_bf16, 1)
  state = jax.jit(step.make_init_fn(
      config, 1, optim.make_optimizer(config.optim, schedules.make_schedules(config, 10))),
                  static_argnums=0)(0)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 16, 1)), jnp.float32)
  features = forward.backbone_features(graphdef, state.teacher, images)
  features_bf16 = forward.backbone_features(graphdef_bf16, state.teacher, images)
  assert features_bf16.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(features_bf16), np.asarray(features), atol=0.1)
  assert not np.array_equal(np.asarray(features_bf16), np.asarray(features))  # really bf16

  def loss(params):
    return jnp.sum(forward.teacher_logits(graphdef_bf16, params, images)**2)

  grads = jax.grad(loss)(state.student)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
  assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(grads))
