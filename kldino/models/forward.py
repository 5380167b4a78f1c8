"""The model's forward passes, shared by the train step, the prior pass and evaluation.

Parameters are pure dicts (`nnx.to_pure_dict`); `graphdef` is the static structure from
`nnx.split`. Crops are batch-major ([B, views, ...] flattened to [B * views, ...]) so that a batch
sharded over devices is reshaped without moving data between devices.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kldino.models.layers import masked_standardise


def _merge(graphdef, params):
  """The model, with its backbone's parameters cast to its compute dtype (float32 masters)."""
  model = nnx.merge(graphdef, params)
  if model.compute_dtype == 'float32':
    return model
  backbone = jax.tree.map(lambda p: p.astype(model.compute_dtype), params['backbone'])
  return nnx.merge(graphdef, {**params, 'backbone': backbone})


def _backbone(model, images, drop_key=None):
  """Backbone features in float32, whatever the compute dtype."""
  features = model.backbone(images.astype(model.compute_dtype), drop_key=drop_key)
  return features.astype(jnp.float32)


def _flatten_views(crops):
  batch, views = crops.shape[:2]
  return crops.reshape(batch * views, *crops.shape[2:]), batch, views


def backbone_features(graphdef, params, images, *, n_last_blocks=1, avgpool_patchtokens=False):
  """What evaluation and export use, in float32: the backbone's `features` (ViT: CLS after the
  final norm; with the options, DINO's linear-evaluation feature, see `ViT.features`)."""
  model = _merge(graphdef, params)
  features = model.backbone.features(images.astype(model.compute_dtype),
                                     n_last_blocks=n_last_blocks,
                                     avgpool_patchtokens=avgpool_patchtokens)
  return features.astype(jnp.float32)


def cls_attention(graphdef, params, images):
  """The backbone's (a ViT's) last-block attention from CLS to the patches, [N, heads, patches]
  float32 (ViT.cls_attention)."""
  model = _merge(graphdef, params)
  return model.backbone.cls_attention(images.astype(model.compute_dtype)).astype(jnp.float32)


def unit_prototypes(graphdef, params):
  """The prototypes as the head uses them ([bottleneck, K], unit columns, centered if asked)."""
  return nnx.merge(graphdef, params).head.unit_prototypes()


def teacher_logits(graphdef, params, images, *, mask=None, standardise=False):
  """t = w . normalize(z) for un-augmented or global views [N, H, W, C] -> [N, K]."""
  model = _merge(graphdef, params)
  embedding = model.head.embed(_backbone(model, images), mask)
  if standardise:
    embedding = masked_standardise(embedding, mask)  # the teacher_bn normalisation (paper sec. 5)
  return model.head.logits(embedding)


def teacher_view_logits(graphdef, params, global_crops, *, standardise=False):
  """Teacher logits of the global views: [B, G, H, W, C] -> [B, G, K]."""
  images, batch, views = _flatten_views(global_crops)
  logits = teacher_logits(graphdef, params, images, standardise=standardise)
  return logits.reshape(batch, views, -1)


def student_view_logits(graphdef, params, global_crops, local_crops, drop_key):
  """Student logits of all views, global first: -> [B, G + L, K].

  Each resolution goes through the backbone in one call; the features of both are joined along
  the view axis so that the head (and its batch statistics) sees all crops together.
  """
  model = _merge(graphdef, params)
  global_key, local_key = jax.random.split(drop_key)
  features = []
  for crops, key in ((global_crops, global_key), (local_crops, local_key)):
    if crops.shape[1] == 0:
      continue
    images, batch, views = _flatten_views(crops)
    features.append(_backbone(model, images, key).reshape(batch, views, -1))
  features = jnp.concatenate(features, axis=1)
  batch, views = features.shape[:2]
  embedding = model.head.embed(features.reshape(batch * views, -1))
  return model.head.logits(embedding).reshape(batch, views, -1)
