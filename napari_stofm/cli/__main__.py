"""``python -m napari_stofm.cli``: the ``stofm`` command, e.g. under ``torchrun -m napari_stofm.cli pretrain``."""
import sys

from napari_stofm.cli.app import main

if __name__ == "__main__":
    sys.exit(main())
