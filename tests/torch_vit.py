"""DINO's linear-evaluation features of the official-DINO-style PyTorch ViT
(kldino/tools/torch_models.py's VisionTransformer), the reference for the features tests."""
import torch


def linear_eval_features(model, images, n_last_blocks=1, avgpool_patchtokens=False):
  """DINO's linear-evaluation input: the CLS tokens of the last n normed layers side by side
  (earliest first); with avgpool, the CLS feature and the patch-token mean of the last layer
  alternate element by element, [cls_0, mean_0, cls_1, mean_1, ...]."""
  layers = model.get_intermediate_layers(images, n_last_blocks)
  features = torch.cat([layer[:, 0] for layer in layers], dim=-1)
  if avgpool_patchtokens:
    patch_mean = layers[-1][:, 1:].mean(dim=1)
    features = torch.stack([features, patch_mean], dim=-1).flatten(1)
  return features
