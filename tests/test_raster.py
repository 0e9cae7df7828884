"""Cell territories: rasterisation, class images and edits mapped back to cells (no napari)."""
from __future__ import annotations

import numpy as np
import pytest

from napari_stofm.errors import StofmInputError
from napari_stofm.review.raster import Territories, rasterize_territories, spacing_of


def _grid(n_side=20, step=10.0, jitter=0.0, seed=0):
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(np.arange(n_side), np.arange(n_side)), -1).reshape(-1, 2) * step
    return g + rng.uniform(-jitter, jitter, g.shape) + (100.0, 50.0)


def test_voronoi_every_pixel_belongs_to_its_nearest_cell():
    xy = _grid(jitter=2.0)
    terr = rasterize_territories(xy)
    assert terr.instance_map.dtype == np.int32
    assert terr.n_cells == len(xy)
    assert terr.hidden_cells.size == 0
    # pixel centres in physical space -> nearest cell equals the instance map (inside radius)
    rows, cols = np.nonzero(terr.instance_map)
    yx = terr.pixel_to_world(np.column_stack([rows, cols]))
    d = np.linalg.norm(yx[:, None, ::-1] - xy[None], axis=2)
    nearest = d.argmin(axis=1)
    assert np.array_equal(nearest + 1, terr.instance_map[rows, cols])
    assert d.min(axis=1).max() <= terr.max_radius + 1e-9


def test_pixel_size_and_radius_follow_spacing_and_cap():
    xy = _grid(step=10.0)
    assert spacing_of(xy) == pytest.approx(10.0)
    terr = rasterize_territories(xy)
    assert terr.scale == pytest.approx((2.5, 2.5))
    assert terr.max_radius == pytest.approx(15.0)
    capped = rasterize_territories(xy, max_pixels=2_000)
    assert capped.instance_map.size <= 2_000
    assert capped.scale[0] > 2.5


def test_radius_cap_leaves_holes_as_background():
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [200.0, 200.0]])
    terr = rasterize_territories(xy, pixel_size=1.0, max_radius=5.0)
    centre = terr.world_to_pixel([100.0, 100.0])
    assert terr.instance_map[tuple(centre)] == 0
    assert terr.cell_at(terr.world_to_pixel([0.0, 0.0])) == 0
    assert terr.cell_at(terr.world_to_pixel([200.0, 200.0])) == 2
    # area close to a disk of radius 5 for the isolated cell
    assert terr.areas[2] == pytest.approx(np.pi * 25, rel=0.15)


def test_napari_axes_are_y_x():
    xy = np.array([[0.0, 0.0], [100.0, 0.0], [0.0, 30.0]])  # wide in x
    terr = rasterize_territories(xy, pixel_size=1.0, max_radius=10.0)
    h, w = terr.shape
    assert w > h
    r, c = terr.world_to_pixel([30.0, 0.0])  # (y, x) of cell 2
    assert terr.instance_map[r, c] == 3


def test_duplicate_positions_still_get_a_pixel():
    xy = np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    terr = rasterize_territories(xy, pixel_size=1.0)
    assert terr.hidden_cells.size == 0


def test_class_image_lookup():
    xy = _grid(n_side=5)
    terr = rasterize_territories(xy)
    codes = np.arange(25) % 3
    codes[4] = -1
    img = terr.class_image(codes)
    inst = terr.instance_map
    assert img.dtype == np.int32
    assert np.all(img[inst == 0] == 0)
    assert np.all(img[inst == 5] == 0)  # unassigned cell 4
    assert np.all(img[inst == 2] == codes[1] + 1)
    window = terr.class_image(codes, bbox=(2, 10, 3, 12))
    assert np.array_equal(window, img[2:10, 3:12])
    with pytest.raises(StofmInputError):
        terr.class_image(codes[:-1])


def test_cells_in_region_by_bbox_and_mask():
    xy = _grid(n_side=6)
    terr = rasterize_territories(xy)
    r, c = terr.world_to_pixel(xy[7][::-1])
    assert 7 in terr.cells_in_region((r, r + 1, c, c + 1))
    mask = terr.instance_map == 8
    assert terr.cells_in_region(mask).tolist() == [7]
    assert terr.cells_in_region((slice(0, 0), slice(0, 0))).size == 0


def _disk(img, rc, radius, value):
    h, w = img.shape
    rr, cc = np.ogrid[:h, :w]
    m = (rr - rc[0]) ** 2 + (cc - rc[1]) ** 2 <= radius ** 2
    img[m] = value
    rows, cols = np.nonzero(m)
    return slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1)


def test_brush_stroke_majority_rule_with_codes_and_images():
    xy = _grid(n_side=10)
    terr = rasterize_territories(xy)
    codes = np.zeros(len(xy), dtype=np.int32)
    old = terr.class_image(codes)
    new = old.copy()
    target = 44
    rc = terr.world_to_pixel(xy[target][::-1])
    bbox = _disk(new, rc, radius=3, value=3)  # covers most of cell 44 only
    cells, new_codes = terr.cells_changed(codes, new, bbox)
    assert cells.tolist() == [target]
    assert new_codes.tolist() == [2]
    # same answer from the old image, and without a bbox
    c2, n2 = terr.cells_changed(old, new)
    assert c2.tolist() == [target] and n2.tolist() == [2]
    # neighbours touched by the brush edge keep their class but are reported as touched
    touched, tcodes = terr.cells_touched(codes, new, bbox)
    assert target in touched.tolist()
    assert tcodes[touched.tolist().index(target)] == 2
    assert set(tcodes[touched != target].tolist()) <= {0}


def test_small_touch_does_not_change_a_cell_and_erase_unassigns():
    xy = _grid(n_side=6)
    terr = rasterize_territories(xy)
    codes = np.ones(len(xy), dtype=np.int32)
    img = terr.class_image(codes)
    rows, cols = np.nonzero(terr.instance_map == 15)
    img[rows[0], cols[0]] = 4  # a single pixel of cell 14
    cells, _ = terr.cells_changed(codes, img, (rows[0], rows[0] + 1, cols[0], cols[0] + 1))
    assert cells.size == 0
    img = terr.class_image(codes)
    img[terr.instance_map == 15] = 0  # erase cell 14 completely
    cells, new_codes = terr.cells_changed(codes, img)
    assert cells.tolist() == [14] and new_codes.tolist() == [-1]


def test_tie_goes_to_the_edit():
    inst = np.array([[1, 1, 1, 1]], dtype=np.int32)
    terr = Territories(inst, (1.0, 1.0), (0.0, 0.0), 1)
    img = np.array([[1, 1, 2, 2]], dtype=np.int32)
    cells, codes = terr.cells_changed(np.array([0]), img)
    assert cells.tolist() == [0] and codes.tolist() == [1]


def test_masks_with_ids_scale_and_unknown_ids():
    masks = np.zeros((20, 30), dtype=np.uint32)
    masks[2:6, 3:9] = 101
    masks[10:15, 10:20] = 205
    masks[16:18, 0:3] = 999  # no cell has this id
    xy = np.array([[12.0, 8.0], [30.0, 25.0]])
    terr = rasterize_territories(xy, masks=masks, mask_ids=[101, 205], mask_scale=2.0, mask_translate=(1.0, 0.5))
    assert terr.source == "masks"
    assert terr.scale == (2.0, 2.0) and terr.translate == (1.0, 0.5)
    assert terr.areas.tolist() == [24, 50]
    assert terr.instance_map[17, 1] == 0
    big = rasterize_territories(xy, masks=masks, mask_ids=[101, 205], max_pixels=200)
    assert big.instance_map.size <= 200 and big.scale[0] > 1.0


def test_bad_input_messages():
    with pytest.raises(StofmInputError, match="non-finite"):
        rasterize_territories(np.array([[0.0, np.nan], [1.0, 1.0]]))
    with pytest.raises(StofmInputError, match=r"\(n, 2\)"):
        rasterize_territories(np.zeros((5, 3)))
    with pytest.raises(StofmInputError, match="no cells"):
        rasterize_territories(np.zeros((0, 2)))
    with pytest.raises(StofmInputError, match="mask id"):
        rasterize_territories(np.zeros((2, 2)), masks=np.zeros((4, 4), int), mask_ids=[1])
    with pytest.raises(StofmInputError, match="over the cap"):
        rasterize_territories(_grid(), pixel_size=0.001)


def test_stroke_at_100k_cells_is_fast():
    import time

    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 5000, (100_000, 2))
    terr = rasterize_territories(xy)
    codes = rng.integers(0, 8, len(xy)).astype(np.int32)
    img = terr.class_image(codes)
    h, w = terr.shape
    bbox = _disk_fast(img, (h // 2, w // 2), 25, 5)
    t = time.perf_counter()
    cells, _ = terr.cells_changed(codes, img, bbox)
    elapsed = time.perf_counter() - t
    assert cells.size > 0
    assert elapsed < 0.1


def _disk_fast(img, rc, radius, value):
    r0, c0 = rc
    yy, xx = np.ogrid[-radius: radius + 1, -radius: radius + 1]
    m = yy ** 2 + xx ** 2 <= radius ** 2
    sl = (slice(r0 - radius, r0 + radius + 1), slice(c0 - radius, c0 + radius + 1))
    img[sl][m] = value
    return sl


def test_small_gaps_inside_the_tissue_are_filled_and_large_holes_kept():
    from scipy import ndimage as ndi

    xy = _grid(n_side=40, step=10.0)
    ij = np.rint((xy - (100.0, 50.0)) / 10.0).astype(int)
    small = (np.abs(ij[:, 0] - 10) <= 1) & (np.abs(ij[:, 1] - 10) <= 1)  # 3 x 3 cells missing
    large = (np.abs(ij[:, 0] - 27) <= 4) & (np.abs(ij[:, 1] - 27) <= 4)  # 9 x 9 cells missing (a ventricle)
    keep = ~small & ~large
    terr = rasterize_territories(xy[keep])
    inside = lambda x, y: terr.instance_map[tuple(terr.world_to_pixel([y, x]))]  # noqa: E731
    assert inside(100.0 + 100, 50.0 + 100) > 0  # the centre of the small gap: a cell's now
    assert inside(100.0 + 270, 50.0 + 270) == 0  # the large hole stays background
    labels, n = ndi.label(terr.instance_map == 0)
    assert n == 2  # the outside and the large hole
    # a filled pixel belongs to a nearest cell
    r, c = terr.world_to_pixel([50.0 + 100, 100.0 + 100])
    distance = np.linalg.norm(xy[keep] - terr.pixel_to_world([r, c])[::-1], axis=1)
    assert distance[terr.instance_map[r, c] - 1] == pytest.approx(distance.min())
    assert distance.min() > terr.max_radius  # beyond the cap: only the filling gives it a cell
    assert terr.areas.sum() == (terr.instance_map > 0).sum()


def test_label_dtype_holds_every_class_value():
    from napari_stofm.review.raster import label_dtype

    assert label_dtype(0) == np.uint8 and label_dtype(255) == np.uint8
    assert label_dtype(256) == np.uint16 and label_dtype(65_535) == np.uint16
    assert label_dtype(65_536) == np.int32


def test_class_image_in_a_small_dtype_and_into_an_array():
    xy = _grid(n_side=8, jitter=2.0)
    terr = rasterize_territories(xy)
    codes = (np.arange(len(xy)) % 5).astype(np.int32)
    codes[3] = -1
    wide = terr.class_image(codes)
    small = terr.class_image(codes, dtype=np.uint8)
    assert small.dtype == np.uint8 and np.array_equal(small, wide)
    out = np.full(terr.shape, 99, dtype=np.uint8)
    assert terr.class_image(codes, out=out) is out and np.array_equal(out, wide)
    window = np.zeros((5, 7), dtype=np.uint16)
    terr.class_image(codes, bbox=(3, 8, 2, 9), out=window)
    assert np.array_equal(window, wide[3:8, 2:9])
    with pytest.raises(StofmInputError, match="does not fit"):
        terr.class_image(np.full(len(xy), 300, dtype=np.int32), dtype=np.uint8)


def test_cell_boxes_hold_every_territory_pixel_even_filled_holes():
    # a ring of cells around a hole a few cells wide: the hole is filled, its pixels go to
    # cells farther away than the territory radius, and their boxes must still hold them
    xy = _grid(n_side=16, step=10.0)
    keep = np.linalg.norm(xy - xy.mean(axis=0), axis=1) > 22.0
    terr = rasterize_territories(xy[keep])
    inst = terr.instance_map
    assert not (inst[tuple(terr.world_to_pixel(xy.mean(axis=0)[::-1]))] == 0)  # the hole was filled
    for cell in range(terr.n_cells):
        rows, cols = np.nonzero(inst == cell + 1)
        box = terr.cell_bbox([cell])
        assert box[0].start <= rows.min() and rows.max() < box[0].stop
        assert box[1].start <= cols.min() and cols.max() < box[1].stop
    # a cell without a pixel (a duplicate position whose one pixel went to its twin) has no box
    twins = rasterize_territories(np.array([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]]), pixel_size=1.0, max_radius=0.4)
    assert twins.hidden_cells.size == 1
    assert twins.cell_bbox(twins.hidden_cells) is None
    assert twins.cell_bbox([2]) is not None


def test_strokes_map_to_the_right_cells_on_a_coarse_raster():
    # a raster capped to a few pixels per cell (what a very large slice gets): painting over
    # most of a cell's territory still gives that cell (and only it) the new class
    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 2000, (4000, 2))
    terr = rasterize_territories(xy, max_pixels=60_000)
    assert terr.instance_map.size <= 60_000
    assert np.median(terr.areas) < 20  # a few pixels per cell
    codes = np.zeros(len(xy), dtype=np.int32)
    image = terr.class_image(codes, dtype=np.uint8)
    for cell in rng.choice(len(xy), 20, replace=False):
        mask = terr.instance_map == cell + 1
        if mask.sum() < 3:
            continue
        edited = image.copy()
        edited[mask] = 3
        box = terr.cell_bbox([cell])
        cells, new_codes = terr.cells_changed(codes, edited, box)
        assert cells.tolist() == [cell] and new_codes.tolist() == [2]
        # the cell under a painted pixel is the one nearest to that pixel's centre
        r, c = np.argwhere(mask)[0]
        yx = terr.pixel_to_world([r, c])
        assert np.linalg.norm(xy - yx[::-1], axis=1).argmin() == cell


def test_spacing_of_a_large_slice_from_a_sample(monkeypatch):
    from napari_stofm.review import raster

    rng = np.random.default_rng(4)
    xy = rng.uniform(0, 1000, (20_000, 2))
    exact = spacing_of(xy)
    monkeypatch.setattr(raster, "SPACING_SAMPLE", 2_000)
    assert spacing_of(xy) == pytest.approx(exact, rel=0.03)


def test_a_small_window_renders_and_maps_like_the_whole_image():
    # windows much smaller than the slice take the per-cell path: same pixels, same mapping
    xy = _grid(n_side=50, jitter=3.0, seed=2)
    terr = rasterize_territories(xy)
    codes = (np.arange(len(xy)) * 7 % 6).astype(np.int32)
    codes[::11] = -1
    whole = terr.class_image(codes, dtype=np.uint8)
    box = (40, 52, 61, 70)
    assert np.array_equal(terr.class_image(codes, bbox=box, dtype=np.uint8), whole[40:52, 61:70])
    out = np.zeros((12, 9), np.uint8)
    terr.class_image(codes, bbox=box, out=out)
    assert np.array_equal(out, whole[40:52, 61:70])
    edited = whole.copy()
    edited[40:52, 61:70] = 6
    by_codes = terr.cells_changed(codes, edited, box)
    by_image = terr.cells_changed(whole, edited, box)
    assert by_codes[0].size and np.array_equal(by_codes[0], by_image[0]) and np.array_equal(by_codes[1], by_image[1])
