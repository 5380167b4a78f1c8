"""Where the process runs: multi-process start-up, XLA flags, host memory, signals, the
hardware's peak, files on disks and in buckets."""
