"""Configs: every key with its default, the cheap checks, a workdir's config and its upgrades."""
