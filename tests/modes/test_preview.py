"""--mode=preview writes what the model sees: evaluation views, training crops, an index."""
import json
import os

import numpy as np
from PIL import Image

from configs.smoke import get_config as smoke_config
from kldino.modes import preview as preview_mode
from kldino.data import datasets, pipeline


def _png(path):
  return np.asarray(Image.open(path))


def test_preview_of_digits_equals_the_evaluation_pipeline(tmp_path):
  config = smoke_config()
  written = preview_mode.run(config,
                             str(tmp_path),
                             output=str(tmp_path / 'p'),
                             split='test',
                             num_images=3)
  out = tmp_path / 'p'
  assert written['num_images'] == 3 and os.path.isfile(out / 'preview.png')
  index = json.loads((out / 'index.json').read_text())
  source = datasets.get_source(config.data)
  batch = next(pipeline.eval_batches(source, 'test', config, batch_size=8))
  assert [entry['label'] for entry in index] == batch['label'][:3].tolist()
  assert [entry['file'] for entry in index
         ] == ['digits:test[0]', 'digits:test[1]', 'digits:test[2]']
  for i in range(3):
    expected = np.round(np.clip(batch['image'][i] * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8)
    np.testing.assert_array_equal(_png(out / f'{i}_eval.png'), expected[..., 0])
    assert _png(out / f'{i}_global_1.png').shape == (16, 16)
    assert _png(out / f'{i}_local_{config.aug.num_local - 1}.png').shape == (8, 8)
  # One row per image: the evaluation view, 2 global and num_local local crops.
  grid = Image.open(out / 'preview.png')
  assert grid.size[0] > (3 + config.aug.num_local) * 16 and grid.size[1] > 3 * 16


def test_preview_of_a_jpeg_folder_names_the_files(tmp_path):
  rng = np.random.default_rng(0)
  files = []
  for name, size in (('cat', (500, 375)), ('dog', (333, 500))):
    os.makedirs(tmp_path / 'root' / 'val' / name)
    path = tmp_path / 'root' / 'val' / name / f'{name}.jpg'
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), np.uint8)).save(path, quality=90)
    files.append(str(path))
  os.makedirs(tmp_path / 'root' / 'train')
  os.symlink(tmp_path / 'root' / 'val' / 'cat', tmp_path / 'root' / 'train' / 'cat')
  os.symlink(tmp_path / 'root' / 'val' / 'dog', tmp_path / 'root' / 'train' / 'dog')
  config = smoke_config()
  config.data.update(name='folder',
                     path=str(tmp_path / 'root'),
                     eval_split='val',
                     mean=(0.5, 0.5, 0.5),
                     std=(0.25, 0.25, 0.25))
  preview_mode.run(config, str(tmp_path), output=str(tmp_path / 'p'), split=None, num_images=5)
  index = json.loads((tmp_path / 'p' / 'index.json').read_text())
  assert sorted(entry['file'] for entry in index) == sorted(files)
  for entry in index:
    assert os.path.isabs(entry['file'])
    assert entry['label'] == ['cat', 'dog'].index(os.path.basename(os.path.dirname(entry['file'])))
  assert _png(tmp_path / 'p' / '0_eval.png').shape == (16, 16, 3)
