"""Cell territories as a label raster, and edits on that raster mapped back to cells.

A tissue slice is a set of cells at positions ``xy`` (``obsm['spatial']``, (x, y) in the
slice's physical unit). To show per-cell classes as a napari Labels image, every cell gets
a *territory* of pixels:

* its segmentation mask, when the data has one (an instance image), or
* a Voronoi territory (the pixels nearer to this cell than to any other) capped at a
  radius, so that the tissue's outline and its real holes (a ventricle, a tear) stay
  background; a gap the cap leaves inside the tissue that is smaller than
  :data:`HOLE_MAX_CELLS` cells (a few cells missing from a dense slice) goes to the nearest
  cells, so that the tissue shows no black specks.

:class:`Territories` keeps the instance map (pixel -> cell) and turns per-cell class codes
into a class image (:meth:`Territories.class_image`) and edited class images back into
per-cell classes (:meth:`Territories.cells_changed`, "a cell takes the class that covers
most of its territory"), touching only the pixels around the edit so that one brush
stroke maps back in milliseconds even at a million cells.

Pure numpy/scipy: no napari import, usable headless.

Pixel ``(row, col)`` of every image here has its centre at physical
``(y, x) = translate + (row, col) * scale``, which is what napari does with a layer's
``scale`` and ``translate``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from napari_stofm import keys
from napari_stofm.errors import StofmInputError

__all__ = ["Territories", "label_dtype", "rasterize_territories", "spacing_of", "territories_for_slice"]

#: Default cap on the size of the territory raster (pixels). It binds from about 400k cells
#: on (a million cells get about 20 pixels each): the raster, the label layers napari edits
#: (single-scale: napari paints on no multiscale Labels) and their GPU textures stay bounded
#: (100 MB of instance map, 25 MB per uint8 label layer), and rasterising a million cells
#: takes seconds, not minutes.
DEFAULT_MAX_PIXELS = 25_000_000
#: Pixels per median cell spacing when the pixel size is chosen automatically.
PIXELS_PER_SPACING = 4.0
#: Territory radius as a multiple of the median cell spacing.
RADIUS_PER_SPACING = 1.5
#: Background enclosed by territories is filled (nearest cell) up to this many cells' area
#: (median spacing squared each); larger enclosed holes stay background.
HOLE_MAX_CELLS = 25

BBox = Tuple[slice, slice]


#: above this many cells, :func:`spacing_of` takes the median over an evenly spaced sample
#: of this many cells (their neighbours are still looked up among all cells)
SPACING_SAMPLE = 200_000


def spacing_of(xy: np.ndarray, tree=None) -> float:
    """Median distance from a cell to its nearest neighbour (ignoring exact duplicates).

    ``tree``: a ``scipy.spatial.cKDTree`` of ``xy`` when the caller has one. Past
    :data:`SPACING_SAMPLE` cells the median is taken over an evenly spaced sample of that
    many cells (deterministic; within a fraction of a percent of the full median)."""
    from scipy.spatial import cKDTree

    xy = np.asarray(xy, dtype=np.float64)
    if len(xy) < 2:
        return 1.0
    k = min(len(xy), 4)
    query = xy if len(xy) <= SPACING_SAMPLE else xy[np.linspace(0, len(xy) - 1, SPACING_SAMPLE).astype(np.int64)]
    dist, _ = (tree if tree is not None else cKDTree(xy)).query(query, k=k, workers=-1)
    dist = dist[:, 1:]
    positive = np.where(dist > 0, dist, np.inf).min(axis=1)
    positive = positive[np.isfinite(positive)]
    if positive.size == 0:
        return 1.0
    return float(np.median(positive))


def label_dtype(n_classes: int) -> np.dtype:
    """The smallest unsigned dtype whose values hold ``0 .. n_classes`` (the label values of
    a class image): uint8 up to 255 classes, uint16 up to 65,535, else int32. napari sends
    uint8 / uint16 labels to the GPU as they are (no per-pixel conversion, half or a quarter
    of the memory of int32)."""
    n = int(n_classes)
    if n <= np.iinfo(np.uint8).max:
        return np.dtype(np.uint8)
    if n <= np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    return np.dtype(np.int32)


def _as_bbox(region, shape) -> BBox:
    """Normalise a bbox given as slices or (r0, r1, c0, c1), clipped to ``shape``."""
    if isinstance(region, tuple) and len(region) == 2 and all(isinstance(s, slice) for s in region):
        rs, cs = region
        r0, r1, _ = rs.indices(shape[0])
        c0, c1, _ = cs.indices(shape[1])
    else:
        r0, r1, c0, c1 = (int(v) for v in region)
        r0, c0 = max(r0, 0), max(c0, 0)
        r1, c1 = min(r1, shape[0]), min(c1, shape[1])
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


@dataclass
class Territories:
    """Pixel territories of the cells of one slice.

    Attributes
    ----------
    instance_map
        (H, W) int32: 0 background, ``i + 1`` = cell ``i``.
    scale, translate
        ``(dy, dx)`` and ``(y0, x0)`` in the slice's physical unit, for napari layers.
    n_cells
        Number of cells (rows of the AnnData).
    source
        ``'voronoi'`` or ``'masks'``.
    """

    instance_map: np.ndarray
    scale: Tuple[float, float]
    translate: Tuple[float, float]
    n_cells: int
    source: str = "voronoi"
    max_radius: Optional[float] = None
    note: str = ""
    _areas: np.ndarray = field(default=None, repr=False)
    _bboxes: np.ndarray = field(default=None, repr=False)

    def __post_init__(self):
        self.instance_map = np.ascontiguousarray(self.instance_map, dtype=np.int32)
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        self.translate = (float(self.translate[0]), float(self.translate[1]))
        if self._areas is None:
            self._areas = np.bincount(self.instance_map.ravel(), minlength=self.n_cells + 1)[
                : self.n_cells + 1
            ].astype(np.int64)
        if self._bboxes is None:
            self._bboxes = _cell_bboxes(self.instance_map, self.n_cells)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.instance_map.shape)  # type: ignore[return-value]

    @property
    def areas(self) -> np.ndarray:
        """Pixels per cell, shape (n_cells,)."""
        return self._areas[1:]

    @property
    def hidden_cells(self) -> np.ndarray:
        """Indices of cells with no pixel (their class cannot be edited on the raster)."""
        return np.flatnonzero(self.areas == 0)

    def cell_bbox(self, cells) -> Optional[BBox]:
        """A box (row and column slices) holding every pixel of the territories of ``cells``
        (None when they have none): the union of their bounding boxes for cell masks; for
        Voronoi territories, of the boxes of the pixels within their reach (a little larger
        than the territories, and known without scanning the raster)."""
        cells = np.atleast_1d(np.asarray(cells, dtype=np.int64))
        if cells.size == 0:
            return None
        b = self._bboxes[cells]
        b = b[b[:, 0] >= 0]
        if b.size == 0:
            return None
        return slice(int(b[:, 0].min()), int(b[:, 1].max())), slice(int(b[:, 2].min()), int(b[:, 3].max()))

    def world_to_pixel(self, yx) -> np.ndarray:
        """Physical (y, x) -> nearest (row, col) pixel index (may fall outside the image)."""
        yx = np.asarray(yx, dtype=np.float64)
        rc = (yx - np.asarray(self.translate)) / np.asarray(self.scale)
        return np.round(rc).astype(np.int64)

    def pixel_to_world(self, rc) -> np.ndarray:
        rc = np.asarray(rc, dtype=np.float64)
        return rc * np.asarray(self.scale) + np.asarray(self.translate)

    def cell_at(self, rc) -> int:
        """Cell index under pixel ``(row, col)``, or -1 for background / outside."""
        r, c = (int(round(float(v))) for v in rc[-2:])
        h, w = self.shape
        if not (0 <= r < h and 0 <= c < w):
            return -1
        return int(self.instance_map[r, c]) - 1

    def as_spatialdata_labels(self) -> dict:
        """The instance map as :func:`napari_stofm.io.export.export_spatialdata` takes it.

        ``offset`` is the (x, y) of the top-left corner of pixel (0, 0) (SpatialData's
        pixel convention), i.e. half a pixel before the centre napari uses.
        """
        dy, dx = self.scale
        y0, x0 = self.translate
        return {"image": self.instance_map, "scale": (dy, dx), "offset": (x0 - dx / 2, y0 - dy / 2)}

    # ------------------------------------------------------------------ rendering
    def _checked_codes(self, codes, dtype) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.shape != (self.n_cells,):
            raise StofmInputError(
                f"expected one class code per cell ({self.n_cells}), got an array of shape {codes.shape}"
            )
        dtype = np.dtype(dtype)
        top = int(codes.max(initial=-1)) + 1
        if np.issubdtype(dtype, np.integer) and top > np.iinfo(dtype).max:
            raise StofmInputError(f"label value {top} does not fit a {dtype} class image")
        return codes

    def _lut(self, codes, dtype=np.int32) -> np.ndarray:
        codes = self._checked_codes(codes, dtype)
        lut = np.zeros(self.n_cells + 1, dtype=dtype)
        lut[1:] = np.where(codes >= 0, codes.astype(np.int64) + 1, 0)
        return lut

    def _values(self, codes, ids: np.ndarray, dtype=np.int32) -> np.ndarray:
        """Label values (``code + 1``; 0 for background and unassigned) of instance ids ``ids``:
        through a per-cell lookup table for a large window, cell by cell for a small one (a
        brush stroke's window at a million cells)."""
        if ids.size * 4 >= self.n_cells:
            return self._lut(codes, dtype)[ids]
        codes = self._checked_codes(codes, dtype)
        out = np.zeros(ids.shape, dtype=dtype)
        fg = ids > 0
        picked = codes[ids[fg] - 1]
        out[fg] = np.where(picked >= 0, picked.astype(np.int64) + 1, 0)
        return out

    def class_image(self, codes, bbox=None, *, dtype=np.int32, out: Optional[np.ndarray] = None) -> np.ndarray:
        """Label image with value ``code + 1`` over each cell's territory (0 background / unassigned).

        With ``bbox`` (slices or ``(r0, r1, c0, c1)``) only that window is rendered.
        ``dtype``: of the image (int32 by default; :func:`label_dtype` gives the smallest
        that fits). ``out``: an array of the window's shape to render into (its dtype wins).
        """
        inst = self.instance_map if bbox is None else self.instance_map[_as_bbox(bbox, self.shape)]
        if out is None:
            return self._values(codes, inst, dtype)
        if inst.size * 4 < self.n_cells:
            out[...] = self._values(codes, inst, out.dtype)
            return out
        return np.take(self._lut(codes, out.dtype), inst, out=out, mode="clip")

    # ------------------------------------------------------------------ queries
    def cells_in_region(self, region) -> np.ndarray:
        """Sorted indices of the cells with at least one pixel in ``region``.

        ``region`` is a boolean (H, W) pixel mask, or a bounding box (two slices or
        ``(r0, r1, c0, c1)``).
        """
        region_arr = np.asarray(region) if not isinstance(region, tuple) else None
        if region_arr is not None and region_arr.dtype == bool and region_arr.shape == self.shape:
            ids = self.instance_map[region_arr]
        else:
            ids = self.instance_map[_as_bbox(region, self.shape)]
        present = np.zeros(self.n_cells + 1, dtype=bool)
        present[ids.ravel()] = True
        present[0] = False
        return np.flatnonzero(present) - 1

    def cells_changed(self, old, new_image, bbox=None) -> Tuple[np.ndarray, np.ndarray]:
        """Map an edit of a class image back to cells.

        Parameters
        ----------
        old
            The class image before the edit ((H, W), values ``code + 1``), or the per-cell
            codes before the edit (1-D, ``-1`` = unassigned) — the latter needs no copy of
            the image.
        new_image
            The class image after the edit (H, W).
        bbox
            Where the edit happened (slices or ``(r0, r1, c0, c1)``); ``None`` scans the
            whole image. Only cells with a changed pixel inside it are considered, but
            each such cell is judged over its whole territory.

        Returns
        -------
        cell_indices, new_codes
            The cells whose class changed and their new codes (``-1`` where the edit
            erased the cell: value 0 means unassigned). A cell takes the value that covers
            most of its territory; a tie goes to the edit rather than to the old class.
        """
        touched, counts, old_vals = self._touched_counts(old, new_image, bbox)
        if touched.size == 0:
            return touched, touched.astype(np.int32)
        winner = _plurality(counts, old_vals)
        changed = winner != old_vals
        return touched[changed], (winner[changed] - 1).astype(np.int32)

    def cells_touched(self, old, new_image, bbox=None) -> Tuple[np.ndarray, np.ndarray]:
        """Like :meth:`cells_changed` but for every cell with an edited pixel.

        Returns ``(cell_indices, codes)`` where ``codes`` is each touched cell's class
        after applying the rule (unchanged cells keep their old code). Used to repaint
        whole territories consistently after a brush stroke.
        """
        touched, counts, old_vals = self._touched_counts(old, new_image, bbox)
        if touched.size == 0:
            return touched, touched.astype(np.int32)
        winner = _plurality(counts, old_vals)
        return touched, (winner - 1).astype(np.int32)

    def _touched_counts(self, old, new_image, bbox):
        new_image = np.asarray(new_image)
        if new_image.shape != self.shape:
            raise StofmInputError(
                f"the edited image has shape {new_image.shape}, the territories {self.shape}"
            )
        old = np.asarray(old)
        by_cell = old.ndim == 1  # per-cell codes rather than an image
        win = _as_bbox(bbox, self.shape) if bbox is not None else (slice(0, self.shape[0]), slice(0, self.shape[1]))
        inst_w = self.instance_map[win]
        new_w = new_image[win]
        old_w = self._values(old, inst_w) if by_cell else old[win]
        diff = old_w != new_w
        touched_ids = np.unique(inst_w[diff])
        touched_ids = touched_ids[touched_ids > 0]
        empty = np.empty(0, dtype=np.int64)
        if touched_ids.size == 0:
            return empty, None, empty
        touched = touched_ids - 1
        # Judge every touched cell over its whole territory: widen to their bbox union.
        full = self.cell_bbox(touched)
        inst_f = self.instance_map[full]
        new_f = np.asarray(new_image[full], dtype=np.int64)
        pos = np.full(self.n_cells + 1, -1, dtype=np.int64)
        pos[touched_ids] = np.arange(touched_ids.size)
        p = pos[inst_f]
        sel = p >= 0
        vals = new_f[sel]
        if vals.size and vals.min() < 0:
            raise StofmInputError("label images must not hold negative values")
        n_vals = int(max(vals.max(initial=0), 0)) + 1
        if by_cell:
            old_vals = self._values(old, touched_ids).astype(np.int64)
        else:
            # The old class of a cell: the value covering most of its territory before.
            old_f = np.asarray(old[full], dtype=np.int64)
            n_old = int(old_f[sel].max(initial=0)) + 1
            oc = np.bincount(p[sel] * n_old + old_f[sel], minlength=touched.size * n_old)
            old_vals = oc.reshape(touched.size, n_old).argmax(axis=1)
        n_vals = max(n_vals, int(old_vals.max(initial=0)) + 1)
        counts = np.bincount(p[sel] * n_vals + vals, minlength=touched.size * n_vals)
        return touched, counts.reshape(touched.size, n_vals), old_vals


def _plurality(counts: np.ndarray, old_vals: np.ndarray) -> np.ndarray:
    """Per row, the column with the largest count; ties go against ``old_vals``."""
    score = counts.astype(np.int64) * 2
    score[np.arange(len(old_vals)), old_vals] -= 1
    return score.argmax(axis=1)


def _cell_bboxes(instance_map: np.ndarray, n_cells: int) -> np.ndarray:
    """(n_cells, 4) int64 array ``r0, r1, c0, c1`` (exclusive ends); -1 rows for empty cells."""
    from scipy import ndimage as ndi

    out = np.full((n_cells, 4), -1, dtype=np.int64)
    objs = ndi.find_objects(instance_map, max_label=n_cells)
    for i, sl in enumerate(objs):
        if sl is not None:
            out[i] = (sl[0].start, sl[0].stop, sl[1].start, sl[1].stop)
    return out


def rasterize_territories(
    xy,
    *,
    pixel_size: Optional[float] = None,
    max_radius: Optional[float] = None,
    masks: Optional[np.ndarray] = None,
    mask_ids: Optional[Sequence[int]] = None,
    mask_scale: Union[float, Sequence[float]] = 1.0,
    mask_translate: Sequence[float] = (0.0, 0.0),
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Territories:
    """Rasterise the territory of every cell.

    Parameters
    ----------
    xy
        (n, 2) cell positions as (x, y) (``obsm['spatial']``).
    pixel_size
        Physical size of one pixel; default: the median nearest-neighbour spacing / 4,
        enlarged if needed so the raster stays under ``max_pixels``.
    max_radius
        Largest distance from a cell to a pixel of its territory; default 1.5 x the
        median spacing.
    masks
        An instance image (H, W) of real cell masks. Its values are the cells' mask ids:
        ``mask_ids[i]`` for cell ``i`` when given, else ``i + 1``. Mask ids that match no
        cell become background. ``mask_scale`` / ``mask_translate`` place the image in
        the slice's physical space ((dy, dx) and (y0, x0)); an image over ``max_pixels``
        is subsampled.
    max_pixels
        Cap on the raster size.
    """
    xy = np.asarray(xy, dtype=np.float64)
    if xy.ndim != 2 or xy.shape[1] != 2:
        raise StofmInputError(f"cell positions must be an (n, 2) array of x, y; got shape {xy.shape}")
    if len(xy) == 0:
        raise StofmInputError("the slice has no cells to display")
    if not np.isfinite(xy).all():
        bad = int((~np.isfinite(xy).all(axis=1)).sum())
        raise StofmInputError(
            f"{bad} cell(s) have non-finite positions in obsm['spatial']; drop or fix them first"
        )
    if masks is not None:
        return _from_masks(xy, masks, mask_ids, mask_scale, mask_translate, max_pixels)
    return _voronoi(xy, pixel_size, max_radius, max_pixels)


def _voronoi(xy, pixel_size, max_radius, max_pixels) -> Territories:
    from scipy.spatial import cKDTree

    n = len(xy)
    tree = cKDTree(xy)
    spacing = spacing_of(xy, tree)
    if max_radius is None:
        max_radius = RADIUS_PER_SPACING * spacing
    max_radius = float(max_radius)
    if not max_radius > 0:
        raise StofmInputError(f"max_radius must be positive, got {max_radius}")
    lo = xy.min(axis=0) - max_radius
    hi = xy.max(axis=0) + max_radius
    extent = hi - lo  # (x, y)
    if pixel_size is None:
        pixel_size = spacing / PIXELS_PER_SPACING
        # keep the raster under max_pixels
        pixel_size = max(pixel_size, float(np.sqrt(extent[0] * extent[1] / max_pixels)))
        while (np.ceil(extent[0] / pixel_size) + 1) * (np.ceil(extent[1] / pixel_size) + 1) > max_pixels:
            pixel_size *= 1.01
    pixel_size = float(pixel_size)
    if not pixel_size > 0:
        raise StofmInputError(f"pixel_size must be positive, got {pixel_size}")
    width = int(np.ceil(extent[0] / pixel_size)) + 1
    height = int(np.ceil(extent[1] / pixel_size)) + 1
    if width * height > max_pixels:
        raise StofmInputError(
            f"a pixel size of {pixel_size:g} makes a {height} x {width} raster, over the cap of "
            f"{max_pixels} pixels; choose a larger pixel_size"
        )
    x0, y0 = float(lo[0]), float(lo[1])

    inst = np.zeros((height, width), dtype=np.int32)
    # Only query pixel blocks within max_radius of some cell.
    block = 64
    nby, nbx = -(-height // block), -(-width // block)
    occ = np.zeros((nby, nbx), dtype=bool)
    rows = np.clip(((xy[:, 1] - y0) / pixel_size).astype(np.int64) // block, 0, nby - 1)
    cols = np.clip(((xy[:, 0] - x0) / pixel_size).astype(np.int64) // block, 0, nbx - 1)
    occ[rows, cols] = True
    reach = int(np.ceil(max_radius / pixel_size / block))
    if reach > 0:
        from scipy import ndimage as ndi

        occ = ndi.binary_dilation(occ, structure=np.ones((2 * reach + 1, 2 * reach + 1), bool))
    col_idx = np.arange(width)
    for by in range(nby):
        r0, r1 = by * block, min((by + 1) * block, height)
        bx = np.flatnonzero(occ[by])
        if bx.size == 0:
            continue
        cmask = np.zeros(width, dtype=bool)
        for b in bx:
            cmask[b * block: (b + 1) * block] = True
        cs = col_idx[cmask]
        rr, cc = np.meshgrid(np.arange(r0, r1), cs, indexing="ij")
        pts = np.column_stack([x0 + cc.ravel() * pixel_size, y0 + rr.ravel() * pixel_size])
        dist, idx = tree.query(pts, k=1, distance_upper_bound=max_radius, workers=-1)
        lab = np.where(np.isfinite(dist), idx + 1, 0).astype(np.int32)
        inst[r0:r1, cs] = lab.reshape(rr.shape)
    # Every pixel of a territory lies within max_radius of its cell, but for the holes filled
    # below (and a cell's own centre pixel): boxes from the positions, widened for those.
    bboxes = _reach_bboxes(xy, (x0, y0), pixel_size, max_radius, (height, width))
    filled = _fill_small_holes(inst, tree, (x0, y0), pixel_size, HOLE_MAX_CELLS * (spacing / pixel_size) ** 2)
    if filled is not None:
        _widen_bboxes(bboxes, *filled)

    # A cell that owns no pixel (a near-duplicate position) gets its centre pixel when
    # the current owner keeps at least one other pixel, so it stays editable.
    areas = np.bincount(inst.ravel(), minlength=n + 1)
    empty = np.flatnonzero(areas[1:] == 0)
    if empty.size:
        rc = np.round((xy[empty][:, ::-1] - (y0, x0)) / pixel_size).astype(np.int64)
        for cell, (r, c) in zip(empty, rc, strict=True):
            if 0 <= r < height and 0 <= c < width:
                owner = inst[r, c]
                if owner == 0 or areas[owner] > 1:
                    areas[owner] -= 1
                    inst[r, c] = cell + 1
                    areas[cell + 1] = 1
    bboxes[areas[1:] == 0] = -1
    return Territories(
        inst, (pixel_size, pixel_size), (y0, x0), n, source="voronoi", max_radius=max_radius,
        _areas=areas.astype(np.int64), _bboxes=bboxes,
    )


def _reach_bboxes(xy, origin, pixel_size: float, radius: float, shape) -> np.ndarray:
    """(n, 4) ``r0, r1, c0, c1``: the pixels within ``radius`` of each cell (and its own
    centre pixel), clipped to ``shape``."""
    rc = (xy[:, ::-1] - (origin[1], origin[0])) / pixel_size
    reach = radius / pixel_size
    lo = np.floor(rc - reach).astype(np.int64) - 1
    hi = np.floor(rc + reach).astype(np.int64) + 2
    h, w = shape
    return np.column_stack([np.clip(lo[:, 0], 0, h), np.clip(hi[:, 0], 0, h),
                            np.clip(lo[:, 1], 0, w), np.clip(hi[:, 1], 0, w)])


def _widen_bboxes(bboxes: np.ndarray, rows: np.ndarray, cols: np.ndarray, cells: np.ndarray) -> None:
    """Grow the boxes of ``cells`` (in place) to take in pixels ``(rows, cols)``."""
    np.minimum.at(bboxes[:, 0], cells, rows)
    np.maximum.at(bboxes[:, 1], cells, rows + 1)
    np.minimum.at(bboxes[:, 2], cells, cols)
    np.maximum.at(bboxes[:, 3], cells, cols + 1)


def _fill_small_holes(inst: np.ndarray, tree, origin, pixel_size: float, max_pixels: float):
    """Give the pixels of every background component that touches no edge of the raster
    and has at most ``max_pixels`` pixels to their nearest cell (in place); returns the
    filled pixels and the cells they went to, ``(rows, cols, cells)``, or None."""
    from scipy import ndimage as ndi

    labels, n = ndi.label(inst == 0)
    if n <= 1:
        return None
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    fill = sizes <= max_pixels
    fill[0] = False
    edges = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    fill[np.unique(edges)] = False
    if not fill.any():
        return None
    rows, cols = np.nonzero(fill[labels])
    del labels
    points = np.column_stack([origin[0] + cols * pixel_size, origin[1] + rows * pixel_size])
    _, idx = tree.query(points, k=1, workers=-1)
    cells = np.asarray(idx, dtype=np.int64)
    inst[rows, cols] = (cells + 1).astype(np.int32)
    return rows, cols, cells


def _from_masks(xy, masks, mask_ids, mask_scale, mask_translate, max_pixels) -> Territories:
    n = len(xy)
    masks = np.asarray(masks)
    if masks.ndim != 2:
        raise StofmInputError(f"cell masks must be a 2-D instance image, got shape {masks.shape}")
    if not np.issubdtype(masks.dtype, np.integer):
        raise StofmInputError(f"cell masks must hold integer ids, got dtype {masks.dtype}")
    scale = np.broadcast_to(np.asarray(mask_scale, dtype=np.float64), (2,)).copy()
    translate = np.asarray(mask_translate, dtype=np.float64).reshape(2)
    step = 1
    if masks.size > max_pixels:
        step = int(np.ceil(np.sqrt(masks.size / max_pixels)))
        masks = masks[::step, ::step]
        scale = scale * step
    if mask_ids is None:
        ids = np.arange(1, n + 1, dtype=np.int64)
    else:
        ids = np.asarray(mask_ids, dtype=np.int64)
        if ids.shape != (n,):
            raise StofmInputError(
                f"mask_ids must give one mask id per cell ({n}), got shape {ids.shape}"
            )
    # mask id -> cell index + 1 (0 for ids matching no cell) through a sorted lookup
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    flat = masks.ravel().astype(np.int64)
    pos = np.searchsorted(sorted_ids, flat)
    pos_c = np.clip(pos, 0, n - 1)
    hit = (sorted_ids[pos_c] == flat) & (flat != 0)
    inst = np.where(hit, order[pos_c] + 1, 0).astype(np.int32).reshape(masks.shape)
    return Territories(inst, tuple(scale), tuple(translate), n, source="masks")


# ----------------------------------------------------------------------------- slices


def territories_for_slice(adata, *, spatial_key: str = keys.SPATIAL, max_pixels: int = DEFAULT_MAX_PIXELS,
                          use_masks: bool = True) -> Territories:
    """Territories of the cells of an AnnData read by :func:`napari_stofm.io.slices.read_slice`.

    When ``adata.uns['stofm_source']`` names a SpatialData labels element (real cell
    masks), the masks are the territories: through the table's ``instance_key`` when the
    table annotates that element, else by the mask id under each cell's position. A store
    that cannot be read, or masks with a rotation, fall back to Voronoi territories (the
    reason is kept in ``Territories.note``).
    """
    xy = np.asarray(adata.obsm[spatial_key], dtype=np.float64)
    source = adata.uns.get(keys.SOURCE, {}) if hasattr(adata, "uns") else {}
    note = ""
    if use_masks and isinstance(source, dict) and source.get("labels_element") and source.get("path"):
        try:
            terr = _territories_from_spatialdata(adata, xy, source, max_pixels)
            if terr is not None:
                return terr
            note = "the cell masks match no cell; showing Voronoi territories"
        except StofmInputError as err:
            note = f"cell masks not used ({err}); showing Voronoi territories"
    terr = rasterize_territories(xy, max_pixels=max_pixels)
    terr.note = note
    return terr


def _territories_from_spatialdata(adata, xy, source, max_pixels) -> Optional[Territories]:
    try:
        import spatialdata as sd
        from spatialdata.transformations import get_transformation
    except ImportError as err:
        raise StofmInputError("the 'spatialdata' package is not installed") from err
    name = source["labels_element"]
    try:
        sdata = sd.read_zarr(source["path"], selection=("labels",))
        element = sdata.labels[name]
    except Exception as err:  # a moved or damaged store
        raise StofmInputError(
            f"could not read labels '{name}' from {source['path']}: {type(err).__name__}: {err}"
        ) from err
    image, level_scale = _finest_level_under(element, max_pixels)
    cs = source.get("coordinate_system", "global")
    transforms = get_transformation(element, get_all=True)
    transform = transforms.get(cs) or transforms.get("global") or next(iter(transforms.values()), None)
    if transform is None:
        matrix = np.eye(3)
    else:
        matrix = np.asarray(transform.to_affine_matrix(input_axes=("y", "x"), output_axes=("y", "x")), dtype=float)
    if abs(matrix[0, 1]) > 1e-9 or abs(matrix[1, 0]) > 1e-9:
        raise StofmInputError(f"labels '{name}' are rotated or sheared relative to the cells")
    scale = np.array([matrix[0, 0], matrix[1, 1]]) * level_scale
    # SpatialData pixel (i, j) spans [i, i + 1): its centre is half a pixel in.
    translate = matrix[:2, 2] + 0.5 * scale
    if (scale <= 0).any():
        raise StofmInputError(f"labels '{name}' are flipped relative to the cells")
    instance_key = source.get("instance_key")
    if source.get("labels_annotated") and instance_key and instance_key in adata.obs:
        ids = np.asarray(adata.obs[instance_key].to_numpy(), dtype=np.int64)
    else:
        rc = np.round((xy[:, ::-1] - translate) / scale).astype(np.int64)
        inside = (rc >= 0).all(axis=1) & (rc[:, 0] < image.shape[0]) & (rc[:, 1] < image.shape[1])
        ids = np.zeros(len(xy), dtype=np.int64)
        ids[inside] = image[rc[inside, 0], rc[inside, 1]]
        # a mask id claimed by several cells is given to none of them but the first
    if not (ids > 0).any():
        return None
    terr = rasterize_territories(xy, masks=image, mask_ids=ids, mask_scale=tuple(scale),
                                 mask_translate=tuple(translate), max_pixels=max_pixels)
    terr.note = f"cell masks from labels '{name}'"
    return terr


def _finest_level_under(element, max_pixels):
    """(2-D numpy image, scale factor of that level) of a labels element (multiscale or not)."""
    if hasattr(element, "children") and not hasattr(element, "dims"):  # a multiscale DataTree
        levels = sorted(element.children)
        first = None
        for level in levels:
            node = element[level]
            arr = next(iter(node.data_vars.values())) if hasattr(node, "data_vars") else node
            if first is None:
                first = arr
            if arr.shape[-2] * arr.shape[-1] <= max_pixels or level == levels[-1]:
                factor = first.shape[-1] / arr.shape[-1]
                return np.asarray(arr.data if hasattr(arr, "data") else arr).squeeze(), float(factor)
    arr = element
    data = arr.data if hasattr(arr, "data") else arr
    return np.asarray(data).squeeze(), 1.0
