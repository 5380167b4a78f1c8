"""Configs: every key with its default, the checks run before anything expensive, and the config
of an existing workdir with its upgrades."""
