"""The input pipeline: dataset sources (TFDS, folders, the embedded digits), augmentation, batches.

TensorFlow here only feeds the host; hide accelerators from it before it initialises, or it
grabs GPU memory that JAX needs.
"""
from absl import logging
import tensorflow as tf

try:
  tf.config.set_visible_devices([], 'GPU')
except RuntimeError:  # TF was initialised by someone else first; nothing left to do but say so.
  logging.warning('TensorFlow was initialised before kldino.data: it may hold GPU memory')
