"""One colour per class name across layers, and a palette that stays distinct at 16-30 classes."""
from __future__ import annotations

import numpy as np
import pytest

from napari_stofm.heads.annotation import Annotation
from napari_stofm.palette import PALETTE, colors_for, default_colors, known_colors


def _lab(hex_color):
    rgb = np.array([int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    rgb = np.where(rgb > 0.04045, ((rgb + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = m @ rgb / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def _min_distance(colors):
    lab = np.array([_lab(c) for c in colors])
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(d, np.inf)
    return d.min()


@pytest.mark.parametrize("n, delta_e", [(16, 25), (20, 25), (30, 20)])
def test_palette_stays_distinct_with_many_classes(n, delta_e):
    colors = default_colors(n)
    assert colors[:3] == ["#e69f00", "#56b4e9", "#009e73"]  # Okabe-Ito first, as before
    assert _min_distance(colors) >= delta_e
    assert len(PALETTE) >= 30


def test_known_colours_first_then_unused_palette_colours():
    known = {"B cell": "#123456", "T cell": "#e69f00"}
    colors = colors_for(["T cell", "Neuron", "B cell", "Glia"], known)
    assert colors[0] == "#e69f00" and colors[2] == "#123456"
    assert len(set(colors)) == 4 and "#e69f00" not in colors[1::2]
    assert colors == colors_for(["T cell", "Neuron", "B cell", "Glia"], known)  # deterministic
    assert colors_for(["a", "b", "c"]) == default_colors(3)


def test_ground_truth_and_prediction_with_shared_names_get_identical_colours(tiny_checkpoint):
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.model.stofm import SToFM
    from napari_stofm.pipeline.predict import run_annotations

    adata = make_sample_slice(600, seed=4)
    truth = adata.obs["cell_type"].astype("category")
    adata.obs["cell_type"] = truth
    n = len(truth.cat.categories)
    stored = ["#%02x%02x%02x" % (20 * i + 10, 200 - 15 * i, 90) for i in range(n)]
    adata.uns["cell_type_colors"] = stored
    rng = np.random.default_rng(0)
    partial = truth.astype(object).where(rng.random(len(truth)) < 0.4)
    adata.obs["partial"] = partial.astype("category")  # its own colours would be the default ones

    found = known_colors(adata, ["cell_type"])
    assert found == dict(zip(map(str, truth.cat.categories), stored, strict=True))
    result = run_annotations(adata, SToFM.load(tiny_checkpoint), label_key="partial", regions=False, device="cpu")
    predicted = result.annotations["stofm_cell_type"]
    ground_truth = Annotation.from_obs(adata, "cell_type")  # the layer of obs['cell_type']
    gt = dict(zip(ground_truth.categories, ground_truth.colors, strict=True))
    shared = [c for c in predicted.categories if c in gt]
    assert shared
    for name, color in zip(predicted.categories, predicted.colors, strict=True):
        if name in gt:
            assert color == gt[name], name
    assert len(set(predicted.colors)) == predicted.n_classes
