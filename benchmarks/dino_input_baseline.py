"""Images/s of the official DINO input pipeline, to put next to `kldino.bench --preset=input`.

    python benchmarks/dino_input_baseline.py --dino=DINO_CHECKOUT --root=ROOT [--workers=2]

Runs DINO's own code, imported from a checkout of github.com/facebookresearch/dino (nothing of
it is copied here): main_dino.DataAugmentationDINO (2 x 224 crops of scale 0.4-1, 8 x 96 of
0.05-0.4) on a torchvision ImageFolder of ROOT/train, through a DataLoader as main_dino.py builds
it (batch 64, shuffled, drop_last, `--workers` loader processes, DINO's default 10 and 2 here on
a 2-core machine). Needs torch, torchvision and PIL, which kldino does not install. Prints one
JSON line with `input_images_per_sec` (an image counts with all its crops), timed over
`--batches` batches after `--warmup` batches (the workers' start-up), epoch after epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--dino', required=True, help='a checkout of facebookresearch/dino')
  parser.add_argument('--root', required=True, help='ImageFolder root, with a train/ split')
  parser.add_argument('--workers', type=int, default=2)
  parser.add_argument('--batch_size', type=int, default=64)
  parser.add_argument('--batches', type=int, default=30)
  parser.add_argument('--warmup', type=int, default=3)
  args = parser.parse_args()
  sys.path.insert(0, args.dino)
  import main_dino  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  import torchvision  # pylint: disable=import-outside-toplevel

  transform = main_dino.DataAugmentationDINO((0.4, 1.0), (0.05, 0.4), 8)
  dataset = torchvision.datasets.ImageFolder(os.path.join(args.root, 'train'), transform)
  loader = torch.utils.data.DataLoader(dataset,
                                       batch_size=args.batch_size,
                                       shuffle=True,
                                       num_workers=args.workers,
                                       drop_last=True,
                                       persistent_workers=True)

  def batches():
    while True:
      yield from loader

  stream = batches()
  for _ in range(args.warmup):
    next(stream)
  start = time.perf_counter()
  for _ in range(args.batches):
    crops, _ = next(stream)
  seconds = time.perf_counter() - start
  assert len(crops) == 10 and tuple(crops[0].shape[-2:]) == (224, 224)
  print(
      json.dumps({
          'pipeline': 'dino DataAugmentationDINO + ImageFolder + DataLoader',
          'workers': args.workers,
          'batch_size': args.batch_size,
          'cpu_count': os.cpu_count(),
          'torch': torch.__version__,
          'torchvision': torchvision.__version__,
          'input_images_per_sec': args.batches * args.batch_size / seconds
      }))


if __name__ == '__main__':
  main()
