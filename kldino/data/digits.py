"""`digits`: scikit-learn's 8x8 handwritten digits as a TFDS dataset, built offline.

The images ship inside scikit-learn, so the default config runs with no network. The train/test
split is fixed (stratified, seeded) and written in order, so a position in a split always names
the same example.
"""
from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection

SPLITS = ('train', 'test')
_TEST_FRACTION = 0.25
_SPLIT_SEED = 0
_MAX_PIXEL = 16  # sklearn's digits count ink in 4x4 blocks: 0..16


def _split_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """{split: (uint8 images [N, 8, 8, 1], int64 labels [N])} in the order they are written."""
  digits = sklearn_datasets.load_digits()
  images = np.round(digits.images * (255 / _MAX_PIXEL)).astype(np.uint8)[..., None]
  train_x, test_x, train_y, test_y = model_selection.train_test_split(images,
                                                                      digits.target,
                                                                      test_size=_TEST_FRACTION,
                                                                      stratify=digits.target,
                                                                      random_state=_SPLIT_SEED)
  return {'train': (train_x, train_y), 'test': (test_x, test_y)}


class Digits(tfds.core.GeneratorBasedBuilder):
  """1797 8x8 grayscale digits, 10 classes: 1347 train, 450 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'From sklearn.datasets.load_digits, stratified 75/25 split.'}

  # TFDS 4.9.10 finds a builder's source through `importlib_resources`, a backport it does not
  # install on Python >= 3.9, and fails while preparing; the source file is simply this one.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description='Optical recognition of handwritten digits (UCI), as shipped by scikit-learn.',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=('image', 'label'),
        # Keep the written order: it is the split order that `index` refers to.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {name: self._generate_examples(*arrays) for name, arrays in _split_arrays().items()}

  def _generate_examples(self, images, labels):
    for position, (image, label) in enumerate(zip(images, labels)):
      yield position, {'image': image, 'label': int(label)}
