"""Evaluation at ImageNet's K in bounded host memory: 50,000 + 50,000 images, K = 65536.

The old protocol gathered one [features | posterior] row per image to the host: [50000, 65536]
float32 alone is 13.1 GB. Here the cluster statistics are reduced on device and the banks stay
sharded, so the evaluation adds little to the process's resident memory. Run as a script, this
file is the measured process (a fresh one, so that its peak RSS is the evaluation's own).
"""
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NUM_EXAMPLES = 50_000
NUM_PROTOTYPES = 65_536
IMAGE = 8


def _register_random_source():
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from kldino.data import datasets  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  splits = {
      split: (rng.integers(0, 256, (NUM_EXAMPLES, IMAGE, IMAGE, 1), dtype=np.uint8),
              rng.integers(0, 10, NUM_EXAMPLES).astype(np.int64)) for split in ('train', 'test')
  }

  def read_range(split, start, stop):
    images, labels = splits[split]
    return tf.data.Dataset.from_tensor_slices({
        'image': images[start:stop],
        'label': labels[start:stop]
    })

  @datasets.SOURCES.register('random_50k')
  def make_source(data_config):
    del data_config
    info = datasets.DatasetInfo(num_classes=10,
                                num_channels=1,
                                num_examples={s: NUM_EXAMPLES for s in splits})
    return datasets.Source(info=info, read_range=read_range)


def peak_rss() -> int:
  """This process's peak resident memory in bytes: /proc's VmHWM, which belongs to the process
  image (getrusage's ru_maxrss keeps the peak of the process that forked it, here a test runner
  holding gigabytes)."""
  with open('/proc/self/status') as status:
    for line in status:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  raise OSError('no VmHWM in /proc/self/status')


def measure():
  """Evaluate a fresh teacher; print the results and the resident memory before and after."""
  _register_random_source()
  import jax  # pylint: disable=g-import-not-at-top
  from kldino.core import program as program_lib  # pylint: disable=g-import-not-at-top
  from kldino.evaluate.evaluators import Evaluators  # pylint: disable=g-import-not-at-top
  from kldino.run import Run  # pylint: disable=g-import-not-at-top
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config()
  config.data.name = 'random_50k'
  config.data.image_size = config.aug.global_size = IMAGE
  config.aug.local_size = 4
  config.model.num_prototypes = NUM_PROTOTYPES
  config.eval.batch_size = 1024
  config.eval.knn_k = (10, 20)
  del config.evals['linear_probe']  # the feature probe gathers features to the host by design
  run = Run(config, tempfile.mkdtemp())
  teacher = program_lib.build(config, run.graphdef, 1, run.mesh, 1).init(0).teacher
  evaluators = Evaluators(run)
  before = peak_rss()
  results = evaluators.final(teacher, 0.04)
  peak = peak_rss()
  print(
      json.dumps({
          'results': results,
          'rss_before': before,
          'rss_peak': peak,
          'devices': jax.device_count()
      }))


def test_evaluation_host_memory_is_bounded():
  env = dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS='--xla_force_host_platform_device_count=8')
  completed = subprocess.run([sys.executable, __file__],
                             env=env,
                             capture_output=True,
                             text=True,
                             timeout=900,
                             check=False)
  assert completed.returncode == 0, completed.stderr[-3000:]
  report = json.loads(completed.stdout.strip().splitlines()[-1])
  results = report['results']
  posterior_bytes = NUM_EXAMPLES * NUM_PROTOTYPES * 4  # what the old protocol held: 13.1 GB
  growth = report['rss_peak'] - report['rss_before']
  print(f"peak RSS {report['rss_peak'] / 2**30:.2f} GiB, growth during the evaluation "
        f'{growth / 2**30:.2f} GiB; one [N, K] posterior array: {posterior_bytes / 2**30:.1f} GiB')
  assert report['devices'] == 8
  assert report['rss_peak'] < 4 * 2**30
  assert growth < posterior_bytes / 10
  assert 0.0 <= results['knn_top1'] <= 1.0 and results['knn_top1'] == results['knn_top1_k20']
  assert 0.0 <= results['cluster_mi'] <= __import__('math').log(NUM_PROTOTYPES)
  assert 1.0 <= results['effective_clusters'] <= NUM_PROTOTYPES


if __name__ == '__main__':
  sys.path.insert(0, REPO)
  measure()
