"""The input pipeline: sources (TFDS, folders, the embedded digits), augmentation, batches."""
