"""Where the process runs: processes, XLA flags, host memory, signals, peak FLOP/s, files."""
