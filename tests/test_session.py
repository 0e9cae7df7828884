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
                         progress=lambda d, t, m: progress.append((d, t, m)))
    assert not result.embedding_reused
    _assert_one_overall_progress(progress, ["Loading the weights", "Reading the reference", "Embedding the slice",
                                            "Tissue regions", "Embedding the reference", "Cell types",
                                            "Cell territories"])
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


def _assert_one_overall_progress(reports, stages):
    """One bar for the whole run: one total, never back, every stage named in order, then done."""
    from napari_stofm.progress import OVERALL_TOTAL

    assert reports and all(total == OVERALL_TOTAL for _, total, _ in reports)
    dones = [done for done, _, _ in reports]
    assert dones == sorted(dones), "the overall progress went back"
    assert reports[-1] == (OVERALL_TOTAL, OVERALL_TOTAL, "done")
    firsts = [next(i for i, (_, _, m) in enumerate(reports) if m.startswith(stage)) for stage in stages]
    assert firsts == sorted(firsts), [reports[i][2] for i in firsts]
    # no stage starts the bar again: each begins where the one before left it
    starts = [reports[i][0] for i in firsts]
    assert starts == sorted(starts) and starts[-1] > 0


def test_relabel_and_accept_mark_cells_curated_as_one_edit(tmp_path):
    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.io.sample import make_sample_slice

    session = SliceSession(make_sample_slice(60, seed=1), name="s", autosave_dir=tmp_path)
    ann = Annotation.from_prediction(CELL_TYPE_KEY, ["A", "B", "C"], np.arange(60) % 3,
                                     np.linspace(0, 1, 60).astype(np.float32))
    session.annotations[CELL_TYPE_KEY] = ann
    heard = []
    session.subscribe(lambda key, what: heard.append((key, what)))
    accepted = session.accept(CELL_TYPE_KEY, [4, 4, 5])
    assert accepted.cells.tolist() == [4, 5] and ann.codes[[4, 5]].tolist() == [1, 2]
    assert ann.curated[[4, 5]].all() and ann.curated.sum() == 2 and heard == [(CELL_TYPE_KEY, "codes")]
    assert not session.accept(CELL_TYPE_KEY, [4]).changed  # already curated: nothing to do
    relabelled = session.relabel(CELL_TYPE_KEY, [4, 7], 0)
    assert relabelled.cells.tolist() == [4, 7] and ann.codes[[4, 7]].tolist() == [0, 0]
    session.restore(CELL_TYPE_KEY, relabelled.previous)  # the undo
    assert ann.codes[[4, 7]].tolist() == [1, 1] and ann.curated[4] and not ann.curated[7]
    with pytest.raises(StofmInputError):
        session.relabel(CELL_TYPE_KEY, [1], 3)


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
