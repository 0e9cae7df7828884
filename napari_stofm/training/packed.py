"""A pretraining corpus packed into one ``.npz`` file: vocabulary, gene tokens and positions.

Reading slices (anndata, gene-identifier resolution, vocabulary building, rank-value
tokenization) needs the whole scverse stack; training needs only torch and numpy. A packed
corpus separates the two, so the slices can be prepared once on a workstation and trained
on elsewhere (a GPU node with a bare PyTorch environment, say)::

    stofm pretrain --data ../shared/data --pack corpus.npz     # prepare (reads the slices)
    stofm pretrain --data corpus.npz -o weights --device cuda  # train from the pack

The file holds plain arrays only (no pickles): the vocabulary as its TSV text, and per
slice its name, the flat token arrays of :class:`~.tokenizer.TokenizedCells`
(``input_ids``, ``offsets``, ``empty``) and the (n, 2) cell positions.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np

from napari_stofm.errors import StofmInputError
from napari_stofm.genes.tokenizer import TokenizedCells
from napari_stofm.genes.vocabulary import GeneVocabulary

PathLike = Union[str, Path]
FORMAT = "napari-stofm packed corpus v1"


@dataclass
class PackedCorpus:
    """Slices ready for pretraining: names, tokens, positions and their vocabulary."""

    names: List[str]
    tokenized: List[TokenizedCells]
    xy: List[np.ndarray]
    vocabulary: GeneVocabulary
    max_genes: int

    def save(self, path: PathLike) -> Path:
        """Write the pack (atomically: a partial file never replaces a good one)."""
        path = Path(path)
        if path.suffix != ".npz":
            raise StofmInputError(f"{path}: a packed corpus file must end in .npz")
        arrays = {"format": np.array(FORMAT), "vocabulary": np.array(self.vocabulary.to_tsv()),
                  "n": np.array(len(self.names)), "max_genes": np.array(self.max_genes)}
        for i, (name, tok, xy) in enumerate(zip(self.names, self.tokenized, self.xy, strict=True)):
            arrays.update({f"name{i}": np.array(name), f"ids{i}": tok.input_ids.astype(np.int32),
                           f"offsets{i}": tok.offsets.astype(np.int64), f"empty{i}": np.asarray(tok.empty, bool),
                           f"xy{i}": np.asarray(xy, dtype=np.float64)})
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp_path = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp_path, **arrays)
        tmp_path.replace(path)
        return path


def is_packed_corpus(path: PathLike) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix == ".npz"


def load_packed_corpus(path: PathLike) -> PackedCorpus:
    """Read a pack written by :meth:`PackedCorpus.save`; a foreign or damaged file is refused."""
    path = Path(path)
    try:
        z = np.load(path, allow_pickle=False)
    except Exception as exc:  # zipfile / value errors of a damaged file
        raise StofmInputError(f"{path} could not be read as a packed corpus ({exc}); pack it again with "
                              "`stofm pretrain --data SLICES --pack FILE.npz`") from exc
    with z:
        if "format" not in z.files or str(z["format"]) != FORMAT:
            raise StofmInputError(f"{path} is not a packed corpus ({FORMAT!r}); write one with "
                                  "`stofm pretrain --data SLICES --pack FILE.npz`")
        vocab = GeneVocabulary.from_tsv(str(z["vocabulary"]), where=f"{path} (vocabulary)")
        max_genes = int(z["max_genes"])
        names, toks, xys = [], [], []
        for i in range(int(z["n"])):
            names.append(str(z[f"name{i}"]))
            toks.append(TokenizedCells(input_ids=z[f"ids{i}"].astype(np.int64), offsets=z[f"offsets{i}"],
                                       empty=z[f"empty{i}"], cls_id=vocab.cls_id, pad_id=vocab.pad_id,
                                       max_genes=max_genes))
            xys.append(z[f"xy{i}"])
    return PackedCorpus(names, toks, xys, vocab, max_genes)


def pack_slices(names: Sequence[str], adatas: Sequence, vocabulary: GeneVocabulary, max_genes: int) -> PackedCorpus:
    """Tokenize AnnData slices with ``vocabulary`` into a :class:`PackedCorpus`."""
    from napari_stofm.genes.tokenizer import tokenize_adata

    toks = [tokenize_adata(a, vocabulary, max_genes=max_genes)[0] for a in adatas]
    xys = [np.asarray(a.obsm["spatial"], dtype=np.float64)[:, :2] for a in adatas]
    return PackedCorpus(list(names), toks, xys, vocabulary, int(max_genes))


def describe(pack: PackedCorpus) -> str:
    n_cells = sum(t.n_cells for t in pack.tokenized)
    return (f"{len(pack.names)} slices, {n_cells} cells, {pack.vocabulary.n_genes} genes, "
            f"up to {pack.max_genes} genes per cell")
