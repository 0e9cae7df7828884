"""Cohorts: many slices in one call, in this process or on a dask cluster.

:func:`embed_many` and :func:`predict_many` (``stofm embed|predict A.h5ad B.h5ad ... -o OUTDIR
[--scheduler ADDRESS]``) run the single-slice pipeline on every slice, one task per slice,
and write ``OUTDIR/<slice name>.h5ad``; ``predict_many(..., joint_regions=K)`` gives every
slice the same K tissue regions (:mod:`napari_stofm.cohort.joint`). See
:mod:`napari_stofm.cohort.runner` for where slices run and how the model travels.
"""
from napari_stofm.cohort.runner import CohortReport, embed_many, parse_scheduler, predict_many, summary_table

__all__ = ["CohortReport", "embed_many", "predict_many", "parse_scheduler", "summary_table"]
