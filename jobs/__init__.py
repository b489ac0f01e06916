"""Thin Ray job entrypoints: ``python -m jobs.<stage> --config FILE [--set key.path=value ...]``."""
