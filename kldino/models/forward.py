"""The model's forward passes, shared by the train step, the prior pass and evaluation.

Parameters are pure dicts (`nnx.to_pure_dict`); `graphdef` is the static structure from
`nnx.split`. Crops are batch-major ([B, views, ...] flattened to [B * views, ...]) so that a batch
sharded over devices is reshaped without moving data between devices.
"""
from __future__ import annotations

from typing import NamedTuple

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


def patch_tokens(graphdef, params, images):
  """The backbone's (a ViT's) patch tokens after the final norm, registers left out,
  [N, patches, D] float32 (patches row-major over the grid; ViT.tokens)."""
  return _tokens(_merge(graphdef, params), images)[1]


def unit_prototypes(graphdef, params):
  """The prototypes as the head uses them ([bottleneck, K], unit columns, centered if asked)."""
  return nnx.merge(graphdef, params).head.unit_prototypes()


def _cls_logits(model, features, mask=None, standardise=False):
  """t = w . normalize(z) of backbone features [N, D] -> [N, K]; `mask` [N] keeps padding rows
  out of batch statistics, `standardise` is the teacher_bn normalisation (paper sec. 5)."""
  embedding = model.head.embed(features, mask)
  if standardise:
    embedding = masked_standardise(embedding, mask)
  return model.head.logits(embedding)


def teacher_logits(graphdef, params, images, *, mask=None, standardise=False):
  """The teacher's logits of un-augmented views [N, H, W, C] -> [N, K]."""
  model = _merge(graphdef, params)
  return _cls_logits(model, _backbone(model, images), mask, standardise)


# iBOT: the masked patches of the global crops, gathered group by group (groups of consecutive
# images, each within one device) to a static number of rows per group.


class MaskedPatches(NamedTuple):
  index: jax.Array  # [groups, size]: positions in the group's flattened [images, G, N] patches
  valid: jax.Array  # [groups * size]: the rows that are masked patches (the rest pad)
  weights: jax.Array  # [groups * size]: DINOv2's 1 / (masked patches of the row's crop), 0 pads


def masked_patches(masks, group: int, size: int) -> MaskedPatches:
  """The masked patches of `masks` [B, G, N], B / `group` groups of `group` images, each
  gathered to its `size` rows (masking.max_masked of its crops: a bound, never exceeded)."""
  batch, views, patches = masks.shape
  grouped = masks.reshape(batch // group, group * views * patches)
  index = jax.vmap(lambda row: jnp.nonzero(row, size=size, fill_value=0)[0])(grouped)
  valid = jnp.arange(size)[None] < jnp.sum(grouped, axis=1, keepdims=True)
  crop_weight = 1.0 / jnp.maximum(jnp.sum(masks, axis=-1), 1).astype(jnp.float32)
  weights = jnp.take_along_axis(jnp.repeat(crop_weight.reshape(batch // group, group * views),
                                           patches,
                                           axis=1),
                                index,
                                axis=1)
  return MaskedPatches(index, valid.reshape(-1), jnp.where(valid, weights, 0.0).reshape(-1))


def _gather(tokens, patches: MaskedPatches):
  """The masked patches' rows [groups * size, D] of tokens [B * G, N, D]."""
  groups = patches.index.shape[0]
  grouped = tokens.reshape(groups, -1, tokens.shape[-1])
  return jnp.take_along_axis(grouped, patches.index[..., None],
                             axis=1).reshape(-1, tokens.shape[-1])


def _tokens(model, images, masks=None, drop_key=None):
  """(CLS [N, D], patches [N, P, D]) of the backbone, in float32."""
  cls, patches = model.backbone.tokens(images.astype(model.compute_dtype),
                                       masks=masks,
                                       drop_key=drop_key)
  return cls.astype(jnp.float32), patches.astype(jnp.float32)


def _patch_logits(model, tokens, patches: MaskedPatches, standardise=False):
  """Logits [groups * size, K] of the masked patches of tokens [B * G, N, D] by the patch head
  (its batch statistics over the valid rows)."""
  head = model.patch_head if model.patch_head is not None else model.head
  embedding = head.embed(_gather(tokens, patches), patches.valid)
  if standardise:
    embedding = masked_standardise(embedding, patches.valid)
  return head.logits(embedding)


def teacher_image_outputs(graphdef,
                          params,
                          images,
                          *,
                          mask=None,
                          standardise=False,
                          patch_standardise=False):
  """The teacher on un-augmented images [N, H, W, C] (the prior pass): (CLS logits [N, K], the
  logits of every patch [N * P, K]); `mask` [N] excludes padding rows from batch statistics."""
  model = _merge(graphdef, params)
  cls, tokens = _tokens(model, images)
  patch_mask = None if mask is None else jnp.repeat(mask, tokens.shape[1])
  head = model.patch_head if model.patch_head is not None else model.head
  patch_embedding = head.embed(tokens.reshape(-1, tokens.shape[-1]), patch_mask)
  if patch_standardise:
    patch_embedding = masked_standardise(patch_embedding, patch_mask)
  return _cls_logits(model, cls, mask, standardise), head.logits(patch_embedding)


def teacher_view_outputs(graphdef,
                         params,
                         global_crops,
                         patches: MaskedPatches | None = None,
                         *,
                         standardise=False,
                         patch_standardise=False):
  """The teacher on the (unmasked) global crops [B, G, H, W, C]: (CLS logits [B, G, K], and with
  iBOT's `patches` (masked_patches) the masked patches' logits [groups * size, K], else None)."""
  model = _merge(graphdef, params)
  images, batch, views = _flatten_views(global_crops)
  if patches is None:
    cls, patch_logits = _backbone(model, images), None
  else:
    cls, tokens = _tokens(model, images)
    patch_logits = _patch_logits(model, tokens, patches, patch_standardise)
  return _cls_logits(model, cls, None, standardise).reshape(batch, views, -1), patch_logits


class StudentOutputs(NamedTuple):
  cls_logits: jax.Array  # [B, G + L, K], the global views first
  patch_logits: jax.Array | None  # [groups * size, K] of iBOT's masked patches, else None
  global_cls: jax.Array  # [B, G, D]: the global views' backbone CLS
  global_patches: jax.Array | None  # [B * G, P, D] (with `global_patches`), else None


def student_view_outputs(graphdef,
                         params,
                         global_crops,
                         local_crops,
                         drop_key,
                         masks=None,
                         patches: MaskedPatches | None = None,
                         *,
                         global_patches: bool = False) -> StudentOutputs:
  """The student on all views (StudentOutputs). With iBOT's `masks` [B, G, N] and `patches`, the
  global crops see the mask token at masked patches; `global_patches` also returns their patch
  tokens after the final norm, as the student sees them (DINOv3's Gram anchoring).

  Each resolution goes through the backbone in one call; the features of both are joined along
  the view axis so that the head (and its batch statistics) sees all crops together.
  """
  model = _merge(graphdef, params)
  global_key, local_key = jax.random.split(drop_key)
  images, batch, views = _flatten_views(global_crops)
  tokens = patch_logits = None
  if patches is None and not global_patches:
    cls = _backbone(model, images, global_key)
  else:
    flat_masks = None if masks is None else masks.reshape(batch * views, -1)
    cls, tokens = _tokens(model, images, flat_masks, global_key)
  if patches is not None:
    patch_logits = _patch_logits(model, tokens, patches)
  features = [cls.reshape(batch, views, -1)]
  if local_crops.shape[1]:
    local_images, _, local_views = _flatten_views(local_crops)
    features.append(_backbone(model, local_images, local_key).reshape(batch, local_views, -1))
  features = jnp.concatenate(features, axis=1)
  cls_logits = _cls_logits(model, features.reshape(-1, features.shape[-1]))
  return StudentOutputs(cls_logits.reshape(batch, features.shape[1], -1), patch_logits,
                        features[:, :views], tokens if global_patches else None)
