"""kldino/tools/torch_profiling.py: the PyTorch baseline's step broken down by kind of op and by
layer, backward included."""
import pytest
import torch

from kldino.tools import bench
from kldino.tools import torch_baseline
from tests.tools.test_torch_baseline import CHANNELS, _config


def test_profile_breaks_the_step_down_by_kind_and_layer_backward_included():
  """kldino/tools/torch_profiling.py: the step's op time by kind sums to its busy time, the matmuls
  are the largest kind, and the backward ops count for the forward layers that made them: almost no
  time is left without a source line (without the sequence-number link, backward would be)."""
  from kldino.tools import torch_profiling  # pylint: disable=g-import-not-at-top
  config = _config('prior', freeze_epochs=0)
  step = torch_baseline.TorchDinoStep(config, CHANNELS)
  crops = {
      key: torch.from_numpy(value) for key, value in bench.random_crops(config, CHANNELS).items()
  }
  step.step(**crops)
  profile = torch_profiling.profile_calls(lambda: step.step(**crops), 1)
  by_category = profile['by_category_ms']
  assert sum(by_category.values()) == pytest.approx(profile['busy_ms'])
  assert by_category['matmul'] > 0 and by_category['elementwise'] > 0
  layers = {source.split(' ')[0] for source in profile['by_source_ms']}
  assert {'Attention', 'Mlp', 'DINOHead'} <= layers
  unattributed = profile['by_source_ms'].get('(no source frame)', 0.0)
  assert unattributed < 0.05 * profile['busy_ms']
  assert torch_profiling.category('aten::addmm') == 'matmul'
  assert torch_profiling.category('aten::native_layer_norm') == 'reduction'
  assert torch_profiling.category('aten::transpose') == 'layout'
  assert torch_profiling.category('aten::gelu') == 'elementwise'
  assert torch_profiling.category('autograd::engine::evaluate_function: MmBackward0') == 'other'
