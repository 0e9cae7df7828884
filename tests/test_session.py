"""The review loop without a display: SliceSession, the library object under the widgets.

Embedding caches and folder-less autosaves go to a per-test cache folder (conftest).
"""
from __future__ import annotations

import numpy as np
import pytest

from napari_stofm.errors import StofmInputError
from napari_stofm.review.session import CELL_TYPE_KEY, REGION_KEY, SliceSession, export_format_of


@pytest.fixture(scope="module")
def slice_file(tmp_path_factory):
    from napari_stofm.io.sample import make_sample_slice

    path = tmp_path_factory.mktemp("slices") / "query.h5ad"
    adata = make_sample_slice(800, seed=2)
    del adata.obs["region"]  # unlabelled tissue: only the cell types stay as a reference check
    truth = adata.obs.pop("cell_type")
    adata.write_h5ad(path)
    return path, truth


def test_reference_transfer_autosave_and_reopen(tiny_checkpoint, slice_file, tmp_path):
    from napari_stofm.io.sample import make_sample_slice

    ref_path = tmp_path / "reference.h5ad"
    make_sample_slice(800, seed=1).write_h5ad(ref_path)
    path, truth = slice_file
    work = tmp_path / path.name
    work.write_bytes(path.read_bytes())

    session = SliceSession.open(work)
    assert session.annotations == {} and session.store.path.parent == tmp_path
    progress = []
    result = session.run(weights=str(tiny_checkpoint), n_regions=5,
                         label_source=("reference", str(ref_path), "cell_type"),
                         progress=lambda d, t, m: progress.append(m))
    assert not result.embedding_reused and progress
    ann = session.annotations[CELL_TYPE_KEY]
    assert ann.categories == list(make_sample_slice(10).obs["cell_type"].cat.categories)
    accuracy = np.mean(np.array(ann.categories, dtype=object)[ann.codes] == truth.astype(str).to_numpy())
    assert accuracy > 1 / len(ann.categories)  # better than chance with an untrained model
    assert session.annotations[REGION_KEY].n_classes == 5
    assert session.store.exists()  # autosaved after the run

    # an edit marks cells curated and autosaves
    terr = session.territories
    img = terr.class_image(ann.codes)
    cells = np.flatnonzero(ann.codes != 4)[:6]
    img[np.isin(terr.instance_map, cells + 1)] = 5
    edit = session.apply_edit(CELL_TYPE_KEY, img)
    assert sorted(edit.cells.tolist()) == sorted(cells.tolist()) and (edit.codes == 4).all()
    session.autosave()

    # reopening the same file offers the curated state back
    again = SliceSession.open(work)
    assert again.restored_from == session.store.path
    restored = again.annotations[CELL_TYPE_KEY]
    np.testing.assert_array_equal(restored.codes, ann.codes)
    np.testing.assert_array_equal(restored.curated, ann.curated)

    # re-running reuses the embedding; re-clustering refuses to drop corrected regions
    assert again.compute(weights=str(tiny_checkpoint), n_regions=4).embedding_reused
    region = session.annotations[REGION_KEY]
    region.assign([0, 1], 1)
    with pytest.raises(StofmInputError, match="corrected by hand"):
        session.recluster(3)
    assert session.recluster(3, discard_curated=True).n_classes == 3


def test_refine_needs_corrections_and_keeps_them(tiny_checkpoint, slice_file, tmp_path):
    path, truth = slice_file
    session = SliceSession.open(path, autosave_dir=tmp_path)
    session.adata.obs["partial"] = truth.where(np.arange(len(truth)) % 3 == 0)
    session.run(weights=str(tiny_checkpoint), n_regions=4, label_source=("column", "partial"))
    ann = session.annotations[CELL_TYPE_KEY]
    given = session.adata.obs["partial"].notna().to_numpy()
    assert (np.array(ann.categories, dtype=object)[ann.codes[given]] ==
            session.adata.obs["partial"][given].astype(str).to_numpy()).all()
    with pytest.raises(StofmInputError, match="corrected"):
        session.refine(CELL_TYPE_KEY)
    ann.assign(np.flatnonzero(ann.codes == 0)[:20], 1)
    curated = ann.curated.copy()
    codes = ann.codes.copy()
    changed = session.refine(CELL_TYPE_KEY)
    np.testing.assert_array_equal(ann.codes[curated], codes[curated])
    assert not curated[changed].any()


def test_edits_with_unknown_labels_and_export_names(slice_file, tmp_path):
    from napari_stofm.heads.annotation import Annotation

    path, _ = slice_file
    session = SliceSession.open(path, autosave_dir=tmp_path)
    n = session.adata.n_obs
    session.annotations["stofm_region"] = Annotation.from_prediction("stofm_region", ["a", "b"], np.zeros(n, np.int32))
    img = session.class_image("stofm_region")
    img[session.territories.instance_map == 1] = 7
    with pytest.raises(StofmInputError, match="not a class"):
        session.apply_edit("stofm_region", img)
    assert export_format_of("x.h5ad") == "h5ad" and export_format_of("x.zarr/") == "spatialdata"
    with pytest.raises(StofmInputError, match="end the name"):
        export_format_of("labels.xlsx")
    out = session.export(tmp_path / "labels.csv")
    assert out.exists()
    with pytest.raises(StofmInputError):
        session.export(tmp_path / "labels.csv")  # no silent overwrite
