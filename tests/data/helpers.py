"""What the data tests share: the digits config and its split built by scikit-learn, in-memory
sources, and photograph-like JPEGs and folders of them."""
import io

import ml_collections
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from sklearn import datasets as sklearn_datasets
from sklearn import model_selection

from benchmarks.make_jpeg_folder import photo_like
from kldino.data import datasets
from tests.helpers import config_module


def digits_config(data_dir) -> ml_collections.ConfigDict:
  """The real configs/digits.py, with its data in `data_dir`."""
  config = config_module('digits').get_config()
  config.data.data_dir = str(data_dir)
  return config


def sklearn_split(split: str):
  """The digits split built independently: pixels 0..16 scaled to 0..255 and rounded."""
  digits = sklearn_datasets.load_digits()
  positions = model_selection.train_test_split(np.arange(len(digits.target)),
                                               test_size=0.25,
                                               stratify=digits.target,
                                               random_state=0)
  chosen = positions[0 if split == 'train' else 1]
  images = np.round(digits.images[chosen] * 255 / 16).astype(np.uint8)[..., None]
  return images, digits.target[chosen]


def read_all(dataset) -> dict:
  examples = list(dataset.as_numpy_iterator())
  return {key: np.stack([example[key] for example in examples]) for key in examples[0]}


def one_line_error(match: str, make, *args):
  with pytest.raises(ValueError, match=match) as error:
    make(*args)
  assert '\n' not in str(error.value)
  return str(error.value)


# --------------------------------------------------------------------------- in-memory sources


def array_source(images: np.ndarray,
                 labels: np.ndarray,
                 num_classes: int,
                 split: str = 'train') -> datasets.Source:

  def read_range(split_name, start, stop):
    return tf.data.Dataset.from_tensor_slices({
        'image': images[start:stop],
        'label': labels[start:stop]
    })

  info = datasets.DatasetInfo(num_classes=num_classes,
                              num_channels=images.shape[-1],
                              num_examples={split: len(images)})
  return datasets.Source(info=info, read_range=read_range)


def index_coded_source(rng, num_examples: int, size: int = 8) -> datasets.Source:
  """Images (random, drawn from `rng`) whose first two pixels spell the example's position (high,
  low byte)."""
  images = rng.integers(0, 256, (num_examples, size, size, 1)).astype(np.uint8)
  positions = np.arange(num_examples)
  images[:, 0, 0, 0], images[:, 0, 1, 0] = positions // 256, positions % 256
  return array_source(images, (positions % 7).astype(np.int64), num_classes=7)


def decoded_positions(images: np.ndarray) -> np.ndarray:
  pixels = np.round(images * 255).astype(np.int64)  # mean 0, std 1: images are [0, 1]
  return pixels[:, 0, 0, 0] * 256 + pixels[:, 0, 1, 0]


def plain_config(**data_overrides) -> ml_collections.ConfigDict:
  """8x8 views, not normalised; the evaluation view of an 8x8 image is the image itself (resized
  to 8, centre 8x8)."""
  config = digits_config('')
  config.data.update(dict(image_size=8, eval_resize=8, mean=(0.0,), std=(1.0,)))
  config.data.update(data_overrides)
  return config


# --------------------------------------------------------------------------- images


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
  """uint8 [H, W, 3] photograph-like content: smooth structure at a few scales, fine noise."""
  return np.asarray(photo_like(width, height, np.random.default_rng(seed)))


def encode(image: np.ndarray, fmt: str = 'JPEG', **options) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format=fmt, **options)
  return buffer.getvalue()


def jpeg(image: np.ndarray, subsampling: int = 2) -> bytes:
  """Quality 90; subsampling 2 is 4:2:0 (PIL's default), 0 is 4:4:4."""
  return encode(image, 'JPEG', quality=90, subsampling=subsampling)


def levels(views) -> np.ndarray:
  """Views in [0, 1] as float pixel levels 0..255."""
  return np.asarray(views, np.float32) * 255


def write_split(root, split: str, images: dict):
  for name, image in images.items():
    folder = root / split / name.split('_')[0]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if name.endswith('.png'):
      path.write_bytes(encode(image, 'PNG'))
    else:
      path.write_bytes(jpeg(image))


def jpeg_folder(root, count: int = 12):
  """A folder of `count` JPEGs of a few sizes in 2 classes, for train and test."""
  images = {
      f'{"ab"[k % 2]}_{k}.jpg': smooth_image(40 + 3 * k, 64 - 2 * k, seed=k) for k in range(count)
  }
  write_split(root, 'train', images)
  write_split(root, 'test', images)


def jpeg_config(root) -> ml_collections.ConfigDict:
  config = config_module('digits').get_config()
  config.data.update(
      dict(name='folder', path=str(root), image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3))
  config.aug.update(
      dict(global_size=16,
           local_size=8,
           num_local=3,
           flip=True,
           color_jitter=(0.4, 0.4, 0.2, 0.1),
           grayscale_prob=0.2))
  config.batch_size = 4
  return config
