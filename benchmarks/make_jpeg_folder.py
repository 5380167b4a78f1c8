"""Writes an image folder of ImageNet-sized JPEGs for the input benchmark.

    python benchmarks/make_jpeg_folder.py --root=/tmp/jpegs [--count=640] [--classes=10]

ROOT/train/<class>/<i>.jpg and ROOT/validation/<class>/<i>.jpg (kldino's `folder` source and
torchvision's ImageFolder both read it): half 500 x 375 landscapes, half 333 x 500 portraits,
ImageNet's two most common sizes, quality 90 with 4:2:0 chroma (PIL's default). The content has
a photograph's spread of frequencies (smooth structure at three scales plus fine noise), so that
their decoding costs about what a photograph's does (~65 kB each; ImageNet's average ~110 kB).
"""
from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

SIZES = ((500, 375), (333, 500))  # (width, height)


def photo_like(width: int, height: int, rng: np.random.Generator) -> Image.Image:
  image = np.zeros((height, width, 3), np.float32)
  for cells, amplitude in ((4, 90), (16, 50), (64, 25)):
    grid = rng.uniform(0, 255, (max(
        2, cells * height // max(height, width)), max(2, cells * width // max(height, width)), 3))
    layer = Image.fromarray(grid.astype(np.uint8)).resize((width, height), Image.BICUBIC)
    image += (np.asarray(layer, np.float32) / 127.5 - 1) * amplitude
  image += 128 + rng.normal(0, 9, image.shape)
  return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', required=True)
  parser.add_argument('--count', type=int, default=640, help='training images (validation: 1/4)')
  parser.add_argument('--classes', type=int, default=10)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  for split, count in (('train', args.count), ('validation', max(args.classes, args.count // 4))):
    for i in range(count):
      folder = os.path.join(args.root, split, f'class_{i % args.classes:03d}')
      os.makedirs(folder, exist_ok=True)
      photo_like(*SIZES[i % 2], rng).save(os.path.join(folder, f'{i:05d}.jpg'), quality=90)
  print(f'wrote {args.count} training images under {args.root}')


if __name__ == '__main__':
  main()
