"""Small backbones' configs, one jitted call and random images, shared by the model tests."""
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kldino.config.defaults import base_config


def model_config(**overrides):
  config = base_config().model
  config.update(name='convnet_small', num_prototypes=16, head_hidden_dim=32, head_bottleneck_dim=8)
  config.update(overrides)
  return config


@nnx.jit
def run(backbone, x, key=None):
  """One compile per model and shape, far cheaper on CPU than compiling each op eagerly."""
  return backbone(x, drop_key=key)


def images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)
