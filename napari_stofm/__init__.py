"""napari-stofm: the SToFM spatial-transcriptomics foundation model, as a library and a napari plugin.

The library is usable without a display::

    import napari_stofm as st
    adata = st.read_slice("slice.h5ad")
    model = st.load_model()            # the bundled weights, offline
    st.embed(adata, model)             # obsm['X_stofm'], obsm['X_stofm_cell']
    st.predict(adata, model, n_regions=7)
    st.embed_many(["a.h5ad", "b.h5ad"], model, out_dir="embedded")   # many slices (client= a dask cluster)

Heavy modules (torch, scanpy) are imported on first use, so importing the package (as
napari does when it reads the plugin manifest) stays cheap.
"""
from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:  # the one place the version is read: the installed package's metadata (pyproject.toml)
    __version__ = version("napari-stofm")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that is not installed
    __version__ = "0+unknown"

_LAZY = {
    "load_model": "napari_stofm.model.stofm",
    "SToFM": "napari_stofm.model.stofm",
    "embed": "napari_stofm.pipeline.embed",
    "compute_embedding": "napari_stofm.pipeline.embed",
    "predict": "napari_stofm.pipeline.predict",
    "run_annotations": "napari_stofm.pipeline.predict",
    "RunResult": "napari_stofm.pipeline.predict",
    "Annotation": "napari_stofm.heads.annotation",
    "markers": "napari_stofm.heads.markers",
    "SliceSession": "napari_stofm.review.session",
    "read_slice": "napari_stofm.io.slices",
    "validate_slice": "napari_stofm.io.slices",
    "export_h5ad": "napari_stofm.io.export",
    "export_csv": "napari_stofm.io.export",
    "export_spatialdata": "napari_stofm.io.export",
    "embed_many": "napari_stofm.cohort",
    "predict_many": "napari_stofm.cohort",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(_LAZY[name])
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'napari_stofm' has no attribute {name!r}")
