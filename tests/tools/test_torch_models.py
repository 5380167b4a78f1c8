"""The baseline's PyTorch models (kldino/tools/torch_models.py): DINO's resize of the position
table, and DINOv2's options equal to the DINOv2 transcription in tests/torch_dinov2.py."""
import pytest
import torch

from kldino.tools import torch_models
from tests import torch_dinov2

CHANNELS = 3


def test_local_crops_resize_the_position_embeddings_as_dino():
  """Smaller crops get DINO's bicubic resize of the learned position table (a = -0.75)."""
  model = torch_models.VisionTransformer(16, 4, CHANNELS, 32, 2, 2)
  table = model.pos_embed[:, 1:].reshape(1, 4, 4, 32).permute(0, 3, 1, 2)
  resized = torch.nn.functional.interpolate(table, size=(2, 2), mode='bicubic', align_corners=False)
  got = model._position_embedding(2, 2)
  assert got.shape == (1, 5, 32)
  torch.testing.assert_close(got[:, 1:], resized.permute(0, 2, 3, 1).reshape(1, 4, 32))
  assert model(torch.zeros(3, CHANNELS, 8, 8)).shape == (3, 32)


@pytest.mark.parametrize('ffn, registers, antialias', [('swiglu', 4, True), ('mlp', 0, False)])
def test_dinov2_options_equal_the_dinov2_transcription(ffn, registers, antialias):
  """The same state dict (strict both ways) gives the same CLS and patch tokens, masked patches
  included, at the trained grid and at a resized one."""
  torch.manual_seed(0)
  options = dict(init_values=0.3, ffn=ffn, num_register_tokens=registers)
  model = torch_models.VisionTransformer(28,
                                         14,
                                         CHANNELS,
                                         48,
                                         2,
                                         3,
                                         mask_token=True,
                                         interpolate_offset=0.1,
                                         interpolate_antialias=antialias,
                                         **options)
  reference = torch_dinov2.DinoVisionTransformer(img_size=28,
                                                 patch_size=14,
                                                 in_chans=CHANNELS,
                                                 dim=48,
                                                 depth=2,
                                                 num_heads=3,
                                                 ffn=ffn,
                                                 init_values=0.3,
                                                 num_register_tokens=registers,
                                                 interpolate_antialias=antialias)
  with torch.no_grad():
    for param in model.parameters():
      param.normal_()
  reference.load_state_dict(model.state_dict(), strict=True)
  model.eval()
  for size in (28, 42, 14):
    images = torch.randn(2, CHANNELS, size, size)
    masks = torch.rand(2, (size // 14)**2) < 0.5
    cls, patches = model.forward_tokens(images, masks)
    expected = reference.forward_features(images, masks)
    torch.testing.assert_close(cls, expected['x_norm_clstoken'], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patches, expected['x_norm_patchtokens'], rtol=1e-5, atol=1e-5)
