"""Every AnnData key this package reads or writes, in one place.

Functions that write a labelling take the key as a parameter (scverse ``key_added=``
style: ``predict(..., region_key=, target_key=)``); the columns that go with it are derived
here, so a renamed key keeps its companions.
"""
from __future__ import annotations

# obsm
SPATIAL = "spatial"  #: (x, y) positions (scverse convention)
EMBEDDING = "X_stofm"  #: final cell representations (SE(2) stage)
CELL_EMBEDDING = "X_stofm_cell"  #: gene-scale embeddings (cell encoder)

# obs written by embed()
VIRTUAL_CELL = "stofm_virtual_cell"  #: the macro-scale virtual cell of each cell
EMPTY = "stofm_empty"  #: True where a cell expresses no vocabulary gene

# predicted labellings
REGION = "stofm_region"
CELL_TYPE = "stofm_cell_type"
PREDICTED_KEYS = (REGION, CELL_TYPE)

# uns
UNS = "stofm"  #: run metadata, provenance, prediction settings
SOURCE = "stofm_source"  #: where read_slice read the slice from
PROVENANCE = "provenance"  #: uns['stofm']['provenance'][key]: how each labelling was made
PREDICTION = "prediction"  #: uns['stofm']['prediction']: the settings of the last predict()
COHORT = "cohort"  #: uns['stofm']['cohort']: the key of a cohort run's output (napari_stofm.cohort)
MARKERS = "stofm_markers"  #: uns['stofm_markers'][key]: the marker genes of each labelling's classes

#: display names of the predicted labellings (napari layer names)
DISPLAY_NAMES = {REGION: "tissue regions", CELL_TYPE: "cell types"}


def confidence_key(key: str) -> str:
    return f"{key}_confidence"


def curated_key(key: str) -> str:
    return f"{key}_curated"


def predicted_key(key: str) -> str:
    return f"{key}_predicted"


def colors_key(key: str) -> str:
    """scanpy's ``uns['<key>_colors']``."""
    return f"{key}_colors"


def companion_keys(key: str) -> tuple:
    """The obs columns written with a predicted labelling ``key``."""
    return key, confidence_key(key), curated_key(key), predicted_key(key)


def display_name(key: str) -> str:
    return DISPLAY_NAMES.get(key, key)
