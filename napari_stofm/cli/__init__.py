"""The ``stofm`` command: ``embed``, ``info``, ``predict``, ``export``, ``demo``, ``pretrain``."""
from napari_stofm.cli.app import main

__all__ = ["main"]
