"""The training corpus: finding and reading the slices (refusing the held-out evaluation
slices), turning them into a :class:`~napari_stofm.training.packed.PackedCorpus` (vocabulary
and gene tokens, read from slices or from one packed ``.npz``), and the containers each stage
draws from: :class:`GeneCorpus` (every non-empty cell's token sequence, stage 1) and
:class:`SpatialSlice` (positions, frozen cell embeddings and virtual cells, stage 2).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Tuple, Union

import numpy as np

from napari_stofm.errors import StofmInputError
from napari_stofm.model.multiscale import build_hypernodes, normalize_coordinates
from napari_stofm.training.config import STATE_DIR

log = logging.getLogger(__name__)

PathLike = Union[str, Path]

#: Slices the shared data README keeps for evaluation only (``dataset/slice``); never train on them.
HELD_OUT_SLICES = (
    "visium_human_dlpfc/151676",
    "st_human_her2st/G2",
    "st_human_her2st/H1",
    "merfish_human_lung_cancer/tessera_warmup",
    "merfish_mouse_hypothalamus_3slices/animal7_bregma-0.09",
    "merfish_mouse_hypothalamus_3slices/animal7_bregma0.16",
)


@dataclass
class CorpusSlice:
    name: str  # dataset/slice
    path: str
    adata: object


def slice_name(path: PathLike) -> str:
    """``dataset/slice`` of a slice file (its folder and its stem)."""
    p = Path(path)
    stem = p.name[: -len(".h5ad")] if p.name.endswith(".h5ad") else p.stem
    return f"{p.parent.name}/{stem}"


def is_held_out(path: PathLike) -> bool:
    return slice_name(path) in HELD_OUT_SLICES


def find_slices(inputs: Sequence[PathLike], exclude_held_out: bool = True) -> Tuple[List[Path], List[Path]]:
    """Slice files of ``inputs`` (files, or folders searched recursively for ``*.h5ad``).

    Returns ``(used, skipped)``: held-out slices found inside a folder are skipped; one
    named explicitly is refused with :class:`StofmInputError` (unless ``exclude_held_out``
    is False).
    """
    used: List[Path] = []
    skipped: List[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if not p.exists():
            raise StofmInputError(f"{p} does not exist: pass slice files (.h5ad) or folders holding them")
        if p.is_dir() and not p.name.endswith(".zarr"):
            found = sorted(p.rglob("*.h5ad"))
            if not found:
                raise StofmInputError(f"{p} holds no .h5ad slice files")
            for f in found:
                (skipped if exclude_held_out and is_held_out(f) else used).append(f)
        else:
            if exclude_held_out and is_held_out(p):
                raise StofmInputError(
                    f"{p} is held out for evaluation ({slice_name(p)}); it must never be used for pretraining. "
                    "Remove it from --data.")
            used.append(p)
    seen, unique = set(), []
    for p in used:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(p)
    if not unique:
        raise StofmInputError("no slice is left to train on (all given slices are held out)")
    return unique, skipped


def check_not_held_out(names: Sequence[str]) -> None:
    bad = [n for n in names if n in HELD_OUT_SLICES]
    if bad:
        raise StofmInputError(f"held-out slices may not be used for pretraining: {', '.join(bad)}")


def read_corpus(paths: Sequence[PathLike]) -> List[CorpusSlice]:
    from napari_stofm.io.slices import read_slice

    out = []
    for p in paths:
        adata = read_slice(p)
        out.append(CorpusSlice(slice_name(p), str(p), adata))
    return out


# --------------------------------------------------------------------------- stage 1: cells


class GeneCorpus:
    """Token sequences of every non-empty cell of the corpus."""

    def __init__(self, tokenized: Sequence, names: Sequence[str]):
        self.tokenized = list(tokenized)
        self.names = list(names)
        refs = []
        for k, tok in enumerate(self.tokenized):
            cells = np.flatnonzero(~np.asarray(tok.empty, dtype=bool))
            refs.append(np.column_stack([np.full(cells.size, k), cells]))
        self.refs = np.concatenate(refs) if refs else np.zeros((0, 2), dtype=np.int64)
        if self.refs.shape[0] == 0:
            raise StofmInputError("no cell of the corpus expresses a vocabulary gene")

    def __len__(self) -> int:
        return self.refs.shape[0]

    def sequences(self, rows: np.ndarray) -> List[np.ndarray]:
        return [self.tokenized[s].cell(c) for s, c in self.refs[rows]]


# --------------------------------------------------------------------------- packed corpus


def load_corpus(data: Sequence[PathLike], adatas, exclude_held_out: bool, vocabulary, max_genes: int,
                min_cells: int = 10):
    """The training slices as a :class:`~.packed.PackedCorpus`.

    ``data`` is one packed corpus (``.npz``) or slice files / folders (``adatas`` may give
    ``(name, AnnData)`` pairs instead). ``vocabulary`` None builds one from the slices (a
    pack brings its own); a given vocabulary must be the pack's (on resume).
    """
    from napari_stofm.genes.vocabulary import build_vocabulary
    from napari_stofm.training.packed import is_packed_corpus, load_packed_corpus, pack_slices

    if adatas is None and any(is_packed_corpus(d) for d in data):
        if len(data) != 1:
            raise StofmInputError("a packed corpus (.npz) must be passed alone to --data")
        pack = load_packed_corpus(data[0])
        if exclude_held_out:
            check_not_held_out(pack.names)
        if vocabulary is not None and list(vocabulary.tokens) != list(pack.vocabulary.tokens):
            raise StofmInputError(f"{data[0]}: its vocabulary is not the one this run started with; "
                                  "resume with the same --data")
        return pack
    if adatas is not None:
        names = [n for n, _ in adatas]
        if exclude_held_out:
            check_not_held_out(names)
        objs = [a for _, a in adatas]
    else:
        paths, skipped = find_slices(data, exclude_held_out=exclude_held_out)
        for p in skipped:
            log.info("held out, not used: %s", slice_name(p))
        corpus = read_corpus(paths)
        names, objs = [c.name for c in corpus], [c.adata for c in corpus]
    if vocabulary is None:
        vocabulary = build_vocabulary(objs, min_cells=min_cells)
    return pack_slices(names, objs, vocabulary, max_genes)


def pack_corpus(data: Sequence[PathLike], path: PathLike, max_genes: int = 255, min_cells: int = 10,
                exclude_held_out: bool = True) -> Path:
    """Read slices, build their vocabulary and tokens, and write them to one ``.npz`` (see
    :mod:`.packed`); :func:`~.trainer.pretrain` then trains from that file alone. Under
    torchrun, process 0 alone writes it; the others wait for it."""
    from napari_stofm.training import distributed

    def write() -> Path:
        return load_corpus(data, None, exclude_held_out, None, max_genes, min_cells=min_cells).save(path)

    ctx = distributed.setup(None)
    try:
        written = ctx.run_on_main(write)
    except BaseException:
        ctx.close(ok=False)
        raise
    ctx.close()
    return Path(path) if written is None else written


# --------------------------------------------------------------------------- stage 2: slices


@dataclass
class SpatialSlice:
    """A slice ready for stage 2: raw positions, frozen cell embeddings, Leiden assignment."""

    name: str
    xy: np.ndarray  # (n, 2) source units (non-empty cells only)
    embeddings: np.ndarray  # (n, D) unit norm
    assignment: np.ndarray  # (n,) virtual cell of each cell


def prepare_spatial_slices(names: Sequence[str], xys: Sequence[np.ndarray], tokenized, *, encoder, device,
                           settings, out_dir: Path, stage1_steps: int, seed: int = 0,
                           cache_only: bool = False) -> List[SpatialSlice]:
    """Frozen cell embeddings (``encoder`` on ``device``) and Leiden virtual-cell assignments
    (``settings``: the model's pipeline settings) of every slice, once; kept in
    ``out_dir/state/stage2_inputs.npz`` so that a resumed run does not recompute them.
    ``cache_only``: read them from that file only (the processes of a multi-process run other
    than the one that wrote it)."""
    cache = Path(out_dir) / STATE_DIR / "stage2_inputs.npz"
    key = f"{stage1_steps}:{seed}:" + ",".join(names)
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as z:
            if str(z["key"]) == key:
                return [SpatialSlice(str(z[f"name{i}"]), z[f"xy{i}"], z[f"emb{i}"], z[f"assign{i}"])
                        for i in range(int(z["n"]))]
    if cache_only:
        raise StofmInputError(f"{cache} does not hold the stage-2 inputs of this run: is {out_dir} on a file "
                              "system every process of the run reads?")
    log.info("stage 2: embedding the cells of %d slices with the frozen encoder", len(names))
    encoder.eval()
    out = []
    for name, xy_all, tok in zip(names, xys, tokenized, strict=True):
        emb = encoder.encode(tok, batch_size=128 if device.type == "cpu" else 1024, device=device)
        ok = ~np.asarray(tok.empty, dtype=bool)
        xy = np.asarray(xy_all, dtype=np.float64)[:, :2][ok]
        emb = emb[ok]
        if xy.shape[0] < 20:
            log.warning("%s: fewer than 20 cells with vocabulary genes; not used in stage 2", name)
            continue
        hyper = build_hypernodes(normalize_coordinates(xy), emb, alpha=settings.hypernode_alpha,
                                 resolution=settings.hypernode_resolution,
                                 max_hypernodes=settings.max_hypernodes, seed=seed)
        out.append(SpatialSlice(name, xy, emb, hyper.assignment))
    if not out:
        raise StofmInputError("no slice has enough cells for the SE(2) stage")
    arrays = {"key": np.array(key), "n": np.array(len(out))}
    for i, sl in enumerate(out):
        arrays.update({f"name{i}": np.array(sl.name), f"xy{i}": sl.xy, f"emb{i}": sl.embeddings,
                       f"assign{i}": sl.assignment})
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache.with_suffix(".tmp.npz"), **arrays)
    cache.with_suffix(".tmp.npz").replace(cache)
    return out
