"""Images that cannot be decoded: skipped, counted once each, named; too many stop the run."""
import numpy as np
from PIL import Image
import pytest
import tensorflow as tf

from kldino.data import augment, datasets, pipeline, unreadable
from tests.data.helpers import jpeg, jpeg_config, smooth_image

CORRUPT = {
    'garbage': b'not an image at all',
    'empty': b'',
    'truncated': jpeg(smooth_image(60, 80))[:300]
}


def folder(root, *, train_bad=(), test_bad=(), count=16):
  """A folder of `count` JPEGs per split in 2 classes; files named in *_bad are corrupt. The
  paths of the corrupt files, per split."""
  bad_paths = {}
  for split, bad in (('train', train_bad), ('test', test_bad)):
    for k in range(count):
      path = root / split / 'ab'[k % 2] / f'{k:02d}.jpg'
      path.parent.mkdir(parents=True, exist_ok=True)
      if k in bad:
        path.write_bytes(list(CORRUPT.values())[k % len(CORRUPT)])
        bad_paths.setdefault(split, set()).add(str(path))
      else:
        path.write_bytes(jpeg(smooth_image(40 + k, 50, seed=k)))
  return bad_paths


def named(source, split):
  return set(source.names(split, source.unreadable.indices.get(split, {})))


def test_eval_skips_and_names_unreadable_images_wherever_they_are(tmp_path):
  """First, middle, consecutive and last files of the split: the tail is seen too."""
  bad = folder(tmp_path, test_bad=(0, 7, 8, 15))
  config = jpeg_config(tmp_path)
  config.data.max_corrupt_fraction = 0.5
  source = datasets.get_source(config.data)
  batches = list(pipeline.eval_batches(source, 'test', config, batch_size=4))
  assert sum(batch['mask'].sum() for batch in batches) == 12
  assert source.unreadable.count('test') == 4 and named(source, 'test') == bad['test']
  labels = np.concatenate([batch['label'][batch['mask']] for batch in batches])
  assert len(labels) == 12  # the views that survived keep their own labels
  list(pipeline.eval_batches(source, 'test', config, batch_size=4))
  assert source.unreadable.count('test') == 4  # read twice, counted once


def test_training_epochs_stay_full_and_skip_the_same_images(tmp_path):
  bad = folder(tmp_path, train_bad=(3, 11))
  config = jpeg_config(tmp_path)
  config.data.max_corrupt_fraction = 0.2
  source = datasets.get_source(config.data)
  for epoch in range(2):
    batches = list(pipeline.train_batches(source, config, epoch=epoch))
    assert len(batches) == pipeline.steps_per_epoch(16, config.batch_size, 1)
    assert all(batch['global_crops'].shape[0] == config.batch_size for batch in batches)
    assert all(np.isfinite(batch['global_crops']).all() for batch in batches)
  assert source.unreadable.count('train') == 2 and named(source, 'train') == bad['train']


def test_more_than_the_allowed_fraction_stops_with_the_names(tmp_path):
  bad = folder(tmp_path, train_bad=(2, 5, 9))
  config = jpeg_config(tmp_path)
  config.data.max_corrupt_fraction = 0.1  # 1 of 16 allowed
  source = datasets.get_source(config.data)
  with pytest.raises(
      unreadable.TooManyUnreadable,
      match='of the 16 images .* cannot be decoded .*max_corrupt_fraction=0.1 of them') as error:
    list(pipeline.train_batches(source, config, epoch=0))
  assert any(path in str(error.value) for path in bad['train'])


def test_a_split_with_nothing_readable_stops_instead_of_spinning(tmp_path):
  folder(tmp_path, train_bad=range(16))
  config = jpeg_config(tmp_path)
  with pytest.raises(ValueError, match=f'none of the first 16 images in {tmp_path / "train"} can'):
    datasets.get_source(config.data)
  folder(tmp_path, train_bad=range(1, 16))  # one good image: not enough for a batch
  config.data.max_corrupt_fraction = 1.0
  source = datasets.get_source(config.data)
  with pytest.raises(unreadable.TooManyUnreadable, match='ran out of images'):
    list(pipeline.train_batches(source, config, epoch=0))


def test_long_runs_of_failures_are_counted_in_full():
  """More consecutive failures than the ring of recent indices holds: all counted, some named."""
  count, bad = 50, set(range(5, 5 + 2 * unreadable.RECENT)) | {49}
  images = [
      b'bad' if i in bad else tf.io.encode_png(tf.zeros([2, 2, 1], tf.uint8)).numpy()
      for i in range(count)
  ]
  examples = tf.data.Dataset.from_tensor_slices({
      'image': images,
      'index': tf.range(count, dtype=tf.int64)
  })
  tally = unreadable.Tally()
  marker = {'image': images[0], 'index': tf.constant(-1, tf.int64)}
  views = unreadable.tolerant_map(examples,
                                  lambda example: {
                                      'pixels': tf.io.decode_png(example['image']),
                                      'index': example['index']
                                  },
                                  tally=tally,
                                  split='s',
                                  end_marker=marker)
  seen = [int(view['index']) for view in views.as_numpy_iterator()]
  assert seen == [i for i in range(count) if i not in bad]
  assert tally.count('s') == len(bad)
  assert set(tally.indices['s']) <= bad and 49 in tally.indices['s']


def test_images_of_other_modes_decode_as_pils_rgb(tmp_path):
  """Grayscale, with alpha, palette and CMYK files of an RGB folder: decoded to PIL's
  convert('RGB') pixels, and none skipped."""
  rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), np.uint8))
  files = {
      'L.png': rgb.convert('L'),
      'LA.png': rgb.convert('LA'),
      'RGBA.png': rgb.convert('RGBA'),
      'P.png': rgb.convert('P'),
      'CMYK.jpg': rgb.convert('CMYK'),
      'RGB.jpg': rgb
  }
  for split in ('train', 'test'):
    for name, image in files.items():
      path = tmp_path / split / name.split('.')[0] / name
      path.parent.mkdir(parents=True)
      image.save(path)
      decoded = augment.decode(tf.io.read_file(str(path)), 3).numpy()
      np.testing.assert_array_equal(decoded, np.asarray(Image.open(path).convert('RGB')))
  config = jpeg_config(tmp_path)
  source = datasets.get_source(config.data)
  batches = list(pipeline.eval_batches(source, 'test', config, batch_size=2))
  assert sum(batch['mask'].sum() for batch in batches) == len(files)
  assert source.unreadable.count('test') == 0
