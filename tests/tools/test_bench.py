"""The benchmark's arithmetic (its timings are measured by the command, never by tests; the command
itself: tests/e2e/test_bench.py)."""
import mmap

import ml_collections
import numpy as np
import pytest

from kldino.tools import bench
from tests.helpers import config_module


def test_time_counts_the_page_faults_of_fresh_host_buffers():
  """A call that maps a fresh 64 MB buffer in 4 KiB pages and touches each page faults once per
  page; a call that reuses its memory faults almost none."""
  size, page = 64 << 20, 4096

  def fresh_buffer():
    buffer = mmap.mmap(-1, size)
    buffer.madvise(mmap.MADV_NOHUGEPAGE)  # 4 KiB pages whatever the kernel's THP mode
    for offset in range(0, size, page):
      buffer[offset] = 1
    return buffer

  _, fresh = bench._time(fresh_buffer, steps=3)
  reused = np.zeros(size // 4, np.float32)

  def refill():
    reused.fill(1.0)
    return reused

  _, warm = bench._time(refill, steps=3)
  assert fresh >= 0.9 * size / page
  assert warm < 0.05 * size / page


def test_prior_pass_epoch_fraction_counts_both_parts():
  config = ml_collections.ConfigDict({'objective': {'gap_examples': 1000}})
  train = {'images_per_sec': 10.0}  # an epoch of 5000 images: 500 s
  prior = {'prior_seconds_per_image': 0.004, 'gap_seconds_per_image': 0.005}
  # 5000 * 0.004 + 1000 * 0.005 = 25 s of 500 s.
  assert bench.prior_pass_epoch_fraction(config, 5000, train, prior) == pytest.approx(0.05)
  config.objective.gap_examples = 0  # the gap over every image
  assert bench.prior_pass_epoch_fraction(config, 5000, train, prior) == pytest.approx(0.09)


def test_presets_have_their_documented_shapes():
  tiny, channels = bench.preset_config('tiny32')
  assert channels == 3 and (tiny.model.name, tiny.model.patch_size) == ('vit_tiny', 4)
  assert (tiny.aug.global_size, tiny.aug.local_size, tiny.aug.num_local) == (32, 16, 6)
  assert (tiny.model.head_hidden_dim, tiny.model.head_bottleneck_dim,
          tiny.model.num_prototypes) == (2048, 256, 4096)
  assert (tiny.batch_size, tiny.prior_pass_batch_size, tiny.model.drop_path) == (64, 256, 0.1)
  small, _ = bench.preset_config('small224')
  assert (small.model.name, small.model.patch_size, small.model.num_prototypes) == ('vit_small', 16,
                                                                                    65536)
  assert (small.aug.global_size, small.aug.local_size, small.aug.num_local) == (224, 96, 6)
  assert (small.batch_size, small.prior_pass_batch_size) == (8, 32)


def test_the_digits_preset_is_the_embedded_default_config():
  config, channels = bench.preset_config('digits')
  assert channels == 1
  assert config.to_dict() == config_module('digits').get_config().to_dict()
  with pytest.raises(Exception, match="unknown preset 'tiny'"):
    bench.preset_config('tiny')
