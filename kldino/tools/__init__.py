"""Tools around training: the benchmark, profiles, the PyTorch baseline and the study report."""
