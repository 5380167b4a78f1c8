"""The input pipeline: dataset sources (TFDS, folders, the embedded digits), augmentation, batches.

TensorFlow here only feeds the host: datasets.get_source hides accelerators from it before it
reads anything (host_only_tensorflow), or it grabs GPU memory that JAX needs. Importing this
package changes nothing.
"""
