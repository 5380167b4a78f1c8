"""kldino's experiment configs: each file's get_config(arg) builds a complete config on
kldino/config/defaults.py; `--config=configs/FILE.py:ARG` passes ARG (configs/common.py:parse_arg
reads it)."""
