"""The DINO head: masked batch norm, prototypes and logits against numpy, argument checks, and
the logits, gradients and init against DINO's DINOHead rebuilt in PyTorch."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kldino.config.workdir import upgrade
from kldino.core import optim
from kldino.models import DINOHead, MaskedBatchNorm, build_model, validate_model_config
from kldino.models.head import init_prototypes
from kldino.models.layers import l2_normalize


def head(**overrides):
  # The widths of tests/models/helpers.py's model_config: each new shape costs a compile.
  args = dict(hidden_dim=32,
              bottleneck_dim=8,
              num_layers=3,
              num_prototypes=16,
              norm='batch',
              rngs=nnx.Rngs(0))
  args.update(overrides)
  return DINOHead(32, **args)


def randn(shape, seed=0):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_masked_batch_norm_matches_numpy_over_the_masked_rows():
  norm = MaskedBatchNorm(5)
  norm.scale[...] = jnp.asarray(randn((5,), 1))
  norm.bias[...] = jnp.asarray(randn((5,), 2))
  x = randn((9, 5), 3) * 4 + 3
  mask = np.array([1, 1, 0, 1, 1, 0, 1, 0, 1], bool)
  real = x[mask]
  expected = ((x - real.mean(0)) / np.sqrt(real.var(0) + 1e-5) * np.asarray(norm.scale[...]) +
              np.asarray(norm.bias[...]))
  out = norm(jnp.asarray(x), jnp.asarray(mask))
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(norm(jnp.asarray(x)), norm(jnp.asarray(x), jnp.ones(9, bool)))


def test_real_rows_do_not_see_the_padding_rows():
  model = head()
  features = randn((8, 32), 4)
  mask = np.arange(8) < 5
  padded = features.copy()
  padded[~mask] = 1e3 * randn((3, 32), 5)
  z = model.embed(jnp.asarray(features), jnp.asarray(mask))
  z_padded = model.embed(jnp.asarray(padded), jnp.asarray(mask))
  np.testing.assert_allclose(z_padded[:5], z[:5], rtol=1e-5, atol=1e-5)
  # Without the mask the padding does leak in: the test above can fail.
  assert not np.allclose(model.embed(jnp.asarray(padded))[:5], z[:5], atol=1e-3)


@pytest.mark.parametrize('norm, num_layers', [('none', 3), ('batch', 2), ('layer', 3), ('none', 1)])
def test_embed_shapes_and_no_normalisation(norm, num_layers):
  model = head(norm=norm, num_layers=num_layers)
  assert len(model.layers) == num_layers
  assert len(model.norms) == (0 if norm == 'none' else num_layers - 1)
  z = model.embed(jnp.asarray(randn((7, 32))))
  assert z.shape == (7, 8)
  assert not np.allclose(np.linalg.norm(z, axis=1), 1.0)


def test_mlp_init_is_lecun_normal_on_request():
  model = head(num_layers=4, init='lecun')
  kernels = np.stack([np.asarray(layer.kernel[...]) for layer in model.layers[:3]])  # 32 -> 32
  assert abs(kernels.std() * np.sqrt(32) - 1.0) < 0.05
  assert all(not np.any(layer.bias[...]) for layer in model.layers)


def test_unit_prototypes_have_unit_columns():
  model = head(prototype_init_std=3.0)
  directions = np.asarray(model.prototypes[...])
  assert directions.shape == (8, 16)
  assert abs(directions.std() - 3.0) < 1.0
  unit = np.asarray(model.unit_prototypes())
  np.testing.assert_allclose(np.linalg.norm(unit, axis=0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(unit, directions / np.linalg.norm(directions, axis=0), rtol=1e-5)


def test_centered_prototypes_are_unit_and_average_to_zero():
  learned, centered = head(), head(prototypes='centered')  # same seed: same directions
  directions = np.asarray(centered.prototypes[...], np.float64)
  np.testing.assert_array_equal(directions, learned.prototypes[...])
  expected = directions
  for _ in range(8):  # alternate the two projections, as the head does
    expected = expected - expected.mean(axis=1, keepdims=True)
    expected = expected / np.linalg.norm(expected, axis=0)
  unit = np.asarray(centered.unit_prototypes())
  np.testing.assert_allclose(unit, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(unit, axis=0), 1.0, rtol=1e-6)
  # One round leaves a visible mean (normalising moves it); eight leave almost none.
  one_round = directions - directions.mean(axis=1, keepdims=True)
  one_round = one_round / np.linalg.norm(one_round, axis=0)
  assert np.linalg.norm(unit.mean(axis=1)) < 1e-3 * np.linalg.norm(one_round.mean(axis=1))


def test_logits_are_cosines():
  model = head()
  z = randn((4, 8), 7) * 5
  directions = np.asarray(model.prototypes[...], np.float64)
  expected = ((z / np.linalg.norm(z, axis=1, keepdims=True))
              @ (directions / np.linalg.norm(directions, axis=0)))
  np.testing.assert_allclose(model.logits(jnp.asarray(z)), expected, rtol=1e-5, atol=1e-6)


def test_fixed_mode_is_recorded_and_uses_the_same_math():
  fixed, learned = head(prototypes='fixed'), head()
  assert fixed.prototype_mode == 'fixed'
  np.testing.assert_array_equal(fixed.unit_prototypes(), learned.unit_prototypes())


@pytest.mark.parametrize('overrides, message', [
    (dict(num_prototypes=1), 'num_prototypes=1 must be >= 2'),
    (dict(norm='group'), "unknown head norm 'group'"),
    (dict(prototypes='random'), "unknown prototypes mode 'random'"),
    (dict(num_layers=0), 'num_layers=0 must be >= 1'),
    (dict(init='xavier'), "unknown head init 'xavier'"),
    (dict(prototype_init_std=-1.0), 'prototype_init_std=-1.0 must be 0'),
    (dict(norm_last_layer=False, prototypes='fixed'),
     "norm_last_layer=False .* needs model.prototypes='learned', not 'fixed'"),
    (dict(norm_last_layer=False, prototypes='centered'),
     "norm_last_layer=False .* needs model.prototypes='learned', not 'centered'"),
])
def test_bad_arguments(overrides, message):
  with pytest.raises(ValueError, match=message):
    head(**overrides)


def test_the_prototype_norm_is_not_fused_into_the_logits_matmul():
  """kldino/runtime/xla_env.py (set by the entry points and tests/conftest.py) turns XLA:CPU's
  reduction fusions off: a prototype column norm fused into the matmul was recomputed per tile (3.8
  s of a 5.3 s ViT-S/16 prior-pass batch)."""
  import re  # pylint: disable=g-import-not-at-top
  prototypes = jnp.ones((32, 4096))
  z = jnp.ones((16, 32))
  text = jax.jit(lambda w, x: l2_normalize(x) @ l2_normalize(w, axis=0)).lower(
      prototypes, z).compile().as_text()
  computations = dict(re.findall(r'^%?([\w.\-]+) \(.*?\{\n(.*?)\n\}', text, re.S | re.M))
  matmul_fusions = re.findall(r'fusion\(.*calls=%?([\w.\-]+).*__ynn_fusion', text)
  fused = [computations[name] for name in matmul_fusions if name in computations]
  assert any(' dot(' in body for body in fused), 'no matmul fusion: the check would be empty'
  assert not any(' reduce(' in body for body in fused if ' dot(' in body)


# ------------------------------------------------------------------------- DINO's head (PyTorch)


def torch_dino_head(in_dim, out_dim, *, norm_last_layer, nlayers, hidden_dim, bottleneck_dim):
  """DINO's DINOHead with use_bn=False (vision_transformer.py), rebuilt from its description:
  Linear/GELU MLP with trunc-normal(.02) kernels and zero biases, applied *before* the last layer
  exists, then L2 normalisation and a weight-normalised Linear without bias, g filled with 1."""
  torch = pytest.importorskip('torch')
  nn = torch.nn

  class TorchDINOHead(nn.Module):

    def __init__(self):
      super().__init__()
      widths = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
      layers = []
      for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
      self.mlp = nn.Sequential(*layers[:-1])  # no GELU after the last linear
      self.apply(self._init_weights)
      self.last_layer = nn.utils.parametrizations.weight_norm(
          nn.Linear(bottleneck_dim, out_dim, bias=False))
      with torch.no_grad():
        self.last_layer.parametrizations.weight.original0.fill_(1.0)  # weight_g [K, 1]
      if norm_last_layer:
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    @staticmethod
    def _init_weights(module):
      if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)  # bounds +-2, absolute
        nn.init.zeros_(module.bias)

    def forward(self, x):
      x = nn.functional.normalize(self.mlp(x), dim=-1, p=2)
      return self.last_layer(x)

  return TorchDINOHead()


def copy_into_torch(model, torch_head):
  """kldino's parameters into the PyTorch head: kernels [in, out] -> weights [out, in],
  prototypes [bottleneck, K] -> weight_v [K, bottleneck], gain [1, K] -> weight_g [K, 1]."""
  import torch  # pylint: disable=g-import-not-at-top
  linears = [module for module in torch_head.mlp if isinstance(module, torch.nn.Linear)]
  assert len(linears) == len(model.layers)
  weight = torch_head.last_layer.parametrizations.weight
  with torch.no_grad():
    for linear, layer in zip(linears, model.layers):
      linear.weight.copy_(torch.from_numpy(np.asarray(layer.kernel[...]).T.copy()))
      linear.bias.copy_(torch.from_numpy(np.asarray(layer.bias[...]).copy()))
    weight.original1.copy_(torch.from_numpy(np.asarray(model.prototypes[...]).T.copy()))
    if not model.norm_last_layer:
      weight.original0.copy_(torch.from_numpy(np.asarray(model.prototype_gain[...]).T.copy()))


def randomise_head(model, seed):
  """Non-zero biases and, without norm_last_layer, gains away from 1: the comparison must see
  every parameter."""
  for index, layer in enumerate(model.layers):
    layer.bias[...] = jnp.asarray(0.1 * randn(layer.bias[...].shape, seed + index))
  if not model.norm_last_layer:
    gain = 1.0 + 0.5 * randn(model.prototype_gain[...].shape, seed + 10)
    model.prototype_gain[...] = jnp.asarray(gain)


@pytest.mark.parametrize('norm_last_layer, num_layers', [(True, 3), (False, 3), (False, 1)])
def test_logits_and_gradients_match_dinos_head_in_pytorch(norm_last_layer, num_layers):
  torch = pytest.importorskip('torch')
  model = head(norm='none', num_layers=num_layers, norm_last_layer=norm_last_layer)
  assert hasattr(model, 'prototype_gain') == (not norm_last_layer)
  randomise_head(model, seed=20)
  torch_head = torch_dino_head(32,
                               16,
                               norm_last_layer=norm_last_layer,
                               nlayers=num_layers,
                               hidden_dim=32,
                               bottleneck_dim=8).double()
  copy_into_torch(model, torch_head)
  features = randn((6, 32), 30) * 3
  logits = model.logits(model.embed(jnp.asarray(features)))
  torch_features = torch.from_numpy(features.astype(np.float64))
  torch_logits = torch_head(torch_features)
  np.testing.assert_allclose(logits, torch_logits.detach().numpy(), rtol=1e-5, atol=1e-5)

  # The raw prototypes and the gain are DINO's weight_v and weight_g: the same gradients, so the
  # per-parameter clipping, AdamW and the epoch-0 freeze act on them as DINO's do.
  weights = randn((6, 16), 31)
  graphdef, params = nnx.split(model, nnx.Param)

  def objective(params):
    merged = nnx.merge(graphdef, params)
    return jnp.sum(merged.logits(merged.embed(jnp.asarray(features))) * weights)

  grads = nnx.to_pure_dict(jax.grad(objective)(params))
  (torch_logits * torch.from_numpy(weights.astype(np.float64))).sum().backward()
  weight = torch_head.last_layer.parametrizations.weight
  np.testing.assert_allclose(grads['prototypes'],
                             weight.original1.grad.numpy().T,
                             rtol=1e-4,
                             atol=1e-6)
  if norm_last_layer:
    assert weight.original0.grad is None  # DINO's g is not trained
  else:
    np.testing.assert_allclose(grads['prototype_gain'],
                               weight.original0.grad.numpy().T,
                               rtol=1e-4,
                               atol=1e-6)
  first = next(module for module in torch_head.mlp if isinstance(module, torch.nn.Linear))
  np.testing.assert_allclose(grads['layers'][0]['kernel'],
                             first.weight.grad.numpy().T,
                             rtol=1e-4,
                             atol=1e-6)


def test_init_matches_dinos_head_statistics():
  """MLP kernels normal(0, .02) and zero biases; raw prototypes uniform(+-1/sqrt(bottleneck)),
  variance 1/(3 bottleneck), as DINO's weight_v (nn.Linear's default, untouched by _init_weights);
  the gain starts at 1. The PyTorch head built as DINO builds it has the same statistics."""
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  bottleneck, num_prototypes = 64, 4096
  model = DINOHead(256,
                   hidden_dim=256,
                   bottleneck_dim=bottleneck,
                   num_layers=3,
                   num_prototypes=num_prototypes,
                   norm_last_layer=False,
                   rngs=nnx.Rngs(1))
  torch_head = torch_dino_head(256,
                               num_prototypes,
                               norm_last_layer=False,
                               nlayers=3,
                               hidden_dim=256,
                               bottleneck_dim=bottleneck)
  torch_linears = [module for module in torch_head.mlp if isinstance(module, torch.nn.Linear)]
  kernels = np.concatenate([np.ravel(layer.kernel[...]) for layer in model.layers])
  torch_kernels = np.concatenate(
      [linear.weight.detach().numpy().ravel() for linear in torch_linears])
  for values in (kernels, torch_kernels):
    assert abs(values.std() / 0.02 - 1) < 0.02 and abs(values.mean()) < 2e-4
  assert all(not np.any(layer.bias[...]) for layer in model.layers)
  assert all(not torch.any(linear.bias) for linear in torch_linears)

  weight = torch_head.last_layer.parametrizations.weight
  bound = 1 / math.sqrt(bottleneck)
  raw = np.asarray(model.prototypes[...])
  assert raw.shape == (bottleneck, num_prototypes)
  for values in (raw, weight.original1.detach().numpy()):
    assert np.abs(values).max() <= bound and np.abs(values).max() > 0.999 * bound
    assert abs(values.var() * 3 * bottleneck - 1) < 0.02 and abs(values.mean()) < 1e-3
  np.testing.assert_array_equal(model.prototype_gain[...], np.ones((1, num_prototypes)))
  np.testing.assert_array_equal(weight.original0.detach().numpy(), np.ones((num_prototypes, 1)))
  # The normal init on request (the digits configs).
  normal = np.asarray(init_prototypes(jax.random.key(0), bottleneck, num_prototypes, 3.0))
  assert abs(normal.std() / 3.0 - 1) < 0.01


def test_the_gain_is_weight_decayed_as_dinos_weight_g():
  """DINO's get_params_groups exempts biases and 1-D parameters only; weight_g is [K, 1], so it
  is decayed. The gain is [1, K] for the same reason; the prototypes are decayed too."""
  model = head(norm='none', norm_last_layer=False)
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  mask = optim.decay_mask(params)
  assert mask['prototype_gain'] and mask['prototypes'] and mask['layers'][0]['kernel']
  assert not mask['layers'][0]['bias']


def test_gain_scales_the_cosines():
  model = head(norm_last_layer=False)
  model.prototype_gain[...] = jnp.arange(1.0, 17.0)[None]
  z = jnp.asarray(randn((4, 8), 40))
  cosines = l2_normalize(z) @ model.unit_prototypes()
  np.testing.assert_allclose(model.logits(z), cosines * jnp.arange(1.0, 17.0), rtol=1e-6)


def old_model_config(**overrides):
  """A model config written before head_init and norm_last_layer existed, as kldino reads it
  (kldino/config/workdir.py:upgrade)."""
  config = upgrade({
      'model':
          dict(name='convnet_small',
               patch_size=4,
               stem='patch',
               drop_path=0.1,
               num_prototypes=16,
               head_hidden_dim=32,
               head_bottleneck_dim=8,
               head_num_layers=3,
               head_norm='batch',
               prototypes='learned',
               prototype_init_std=1.0)
  }).model
  config.update(overrides)
  return config


def test_configs_without_the_new_keys_build_the_head_they_built():
  model = build_model(old_model_config(), in_channels=1, image_size=16, rngs=nnx.Rngs(0))
  assert model.head.norm_last_layer and not hasattr(model.head, 'prototype_gain')
  kernel = np.asarray(model.head.layers[1].kernel[...])  # 32 -> 32: LeCun normal, std 1/sqrt(32)
  assert 0.1 < kernel.std() < 0.25
  new = old_model_config(head_init='dino', prototype_init_std=0.0, norm_last_layer=False)
  model = build_model(new, in_channels=1, image_size=16, rngs=nnx.Rngs(0))
  assert np.asarray(model.head.layers[1].kernel[...]).std() < 0.03
  assert np.abs(np.asarray(model.head.prototypes[...])).max() <= 1 / math.sqrt(8)
  assert model.head.prototype_gain[...].shape == (1, 16)


@pytest.mark.parametrize('overrides, message', [
    (dict(head_init='he'), "unknown model.head_init 'he'"),
    (dict(prototype_init_std=-0.5), 'model.prototype_init_std=-0.5 must be 0'),
    (dict(norm_last_layer=False, prototypes='fixed'),
     "model.norm_last_layer=False .* needs model.prototypes='learned', not 'fixed'"),
    (dict(norm_last_layer=False, prototypes='centered'), "not 'centered'"),
])
def test_validate_model_config_refuses_bad_head_options(overrides, message):
  with pytest.raises(ValueError, match=message) as error:
    validate_model_config(old_model_config(**overrides))
  assert '\n' not in str(error.value)
