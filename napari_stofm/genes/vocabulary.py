"""GeneVocabulary: gene token ids and their rank-value normalisation factors.

Token ids: ``<pad>`` = 0, ``<mask>`` = 1, genes from 2, ``<cls>`` last (the published
dictionaries may differ; their ids are kept as they are, since the encoder's weights
depend on them). Genes are held as canonical ids (:func:`genes.canonical_gene_id`:
upper-case human symbols, or bare Ensembl IDs the bundled table does not know).

The normalisation factor of a gene is Geneformer's "gene median": the median, over the
corpus cells that express the gene, of its expression / cell total * 10,000.

On disk: ``vocabulary.tsv`` with columns ``token_id, gene, norm_factor, n_cells_seen``
(special tokens have an empty norm_factor; ``n_cells_seen`` is -1 where unknown).
"""
from __future__ import annotations

import builtins
import csv
import io
import json
import math
import pickle
from pathlib import Path
from struct import error as struct_error
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import scipy.sparse as sp

from napari_stofm.errors import CheckpointError, StofmInputError
from napari_stofm.genes.expression import as_csr, expression_values_kind, normalize_expression
from napari_stofm.genes.identifiers import (
    HUMAN,
    canonical_gene_ids,
    control_probe_mask,
    default_gene_names,
    detect_species,
    normalize_species,
)
from napari_stofm.progress import CancelToken, ProgressCallback, check_cancelled, report

PAD = "<pad>"
MASK = "<mask>"
CLS = "<cls>"
SPECIAL_TOKENS = (PAD, MASK, CLS)
TSV_NAME = "vocabulary.tsv"
TSV_COLUMNS = ("token_id", "gene", "norm_factor", "n_cells_seen")

PathLike = Union[str, Path]
#: largest token id read from a Geneformer dictionary (the published one has about 25,000)
MAX_TOKEN_ID = 10_000_000


def _is_special(name: str) -> bool:
    return name.startswith("<") and name.endswith(">")


class GeneVocabulary:
    """Ordered tokens (index = token id) with a normalisation factor per gene token.

    ``tokens[i]`` names token ``i``; it must hold ``<pad>``, ``<mask>`` and ``<cls>``.
    ``norm_factors[i]`` is NaN for special tokens; a gene with a NaN factor cannot be
    tokenized and is not matched.
    """

    def __init__(self, tokens: Sequence[str], norm_factors: Sequence[float],
                 n_cells_seen: Optional[Sequence[int]] = None):
        self.tokens = np.array([str(t) for t in tokens], dtype=object)
        self.norm_factors = np.asarray(norm_factors, dtype=np.float64).copy()
        n = self.tokens.size
        if self.norm_factors.shape != (n,):
            raise ValueError(f"norm_factors has shape {self.norm_factors.shape}, expected ({n},)")
        if n_cells_seen is None:
            self.n_cells_seen = np.full(n, -1, dtype=np.int64)
        else:
            self.n_cells_seen = np.asarray(n_cells_seen, dtype=np.int64).copy()
            if self.n_cells_seen.shape != (n,):
                raise ValueError(f"n_cells_seen has shape {self.n_cells_seen.shape}, expected ({n},)")
        index = {}
        for i, t in enumerate(self.tokens):
            index.setdefault(t, i)  # a repeated gene resolves to its first (lowest) token id
        for special in SPECIAL_TOKENS:
            if special not in index:
                raise ValueError(f"the vocabulary has no {special} token")
        self._index = index
        self.pad_id = index[PAD]
        self.mask_id = index[MASK]
        self.cls_id = index[CLS]
        special = np.array([_is_special(t) for t in self.tokens], dtype=bool)
        self.norm_factors[special] = np.nan
        self._is_gene = ~special
        bad = self._is_gene & np.isfinite(self.norm_factors) & (self.norm_factors <= 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"gene {self.tokens[i]!r} has a non-positive normalisation factor {self.norm_factors[i]}")
        usable = self._is_gene & np.isfinite(self.norm_factors)
        first = np.array([index[t] == i for i, t in enumerate(self.tokens)], dtype=bool)
        keep = np.flatnonzero(usable & first)
        self._lookup = pd.Index(self.tokens[keep])
        self._lookup_ids = keep.astype(np.int64)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_genes(cls, genes: Sequence[str], norm_factors: Sequence[float],
                   n_cells_seen: Optional[Sequence[int]] = None) -> "GeneVocabulary":
        """``<pad>``=0, ``<mask>``=1, ``genes`` from 2 in the given order, ``<cls>`` last."""
        genes = [str(g) for g in genes]
        nf = list(np.asarray(norm_factors, dtype=np.float64))
        seen = [-1] * len(genes) if n_cells_seen is None else [int(x) for x in n_cells_seen]
        if not (len(genes) == len(nf) == len(seen)):
            raise ValueError("genes, norm_factors and n_cells_seen must have the same length")
        tokens = [PAD, MASK] + genes + [CLS]
        return cls(tokens, [np.nan, np.nan] + nf + [np.nan], [0, 0] + seen + [0])

    # ---------------------------------------------------------------- queries

    def __len__(self) -> int:
        return int(self.tokens.size)

    @property
    def size(self) -> int:
        return len(self)

    @property
    def n_genes(self) -> int:
        """Number of gene tokens (special tokens excluded)."""
        return int(self._is_gene.sum())

    @property
    def genes(self) -> list:
        """Gene names in token-id order."""
        return [str(t) for t in self.tokens[self._is_gene]]

    def __contains__(self, gene) -> bool:
        return self.token_id(gene) >= 0

    def token_id(self, gene) -> int:
        """Token id of a canonical gene id, -1 when it is not a usable gene token."""
        return int(self.lookup([gene])[0])

    def lookup(self, canonical_ids: Sequence[str]) -> np.ndarray:
        """Token ids of canonical gene ids (int64), -1 for unknown genes or genes without a factor."""
        pos = self._lookup.get_indexer(pd.Index(np.asarray(canonical_ids, dtype=object)))
        return np.where(pos >= 0, self._lookup_ids[np.maximum(pos, 0)], -1).astype(np.int64)

    def __eq__(self, other) -> bool:
        if not isinstance(other, GeneVocabulary):
            return NotImplemented
        return (np.array_equal(self.tokens, other.tokens)
                and np.array_equal(self.norm_factors, other.norm_factors, equal_nan=True)
                and np.array_equal(self.n_cells_seen, other.n_cells_seen))

    def __repr__(self) -> str:
        return f"GeneVocabulary({self.n_genes} genes, {len(self)} tokens)"

    # ---------------------------------------------------------------- TSV

    def to_tsv(self) -> str:
        """The text of ``vocabulary.tsv``."""
        buf = io.StringIO()
        buf.write("\t".join(TSV_COLUMNS) + "\n")
        for i, (t, f, n) in enumerate(zip(self.tokens, self.norm_factors, self.n_cells_seen, strict=True)):
            if "\t" in t or "\n" in t:
                raise ValueError(f"gene id {t!r} holds a tab or newline")
            buf.write(f"{i}\t{t}\t{'' if math.isnan(f) else repr(float(f))}\t{int(n)}\n")
        return buf.getvalue()

    def save(self, path: PathLike) -> Path:
        """Write ``vocabulary.tsv`` (``path`` is the file, or a folder to write it into)."""
        path = Path(path)
        if path.is_dir():
            path = path / TSV_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_tsv(), encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: PathLike) -> "GeneVocabulary":
        """Read ``vocabulary.tsv`` (or a folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / TSV_NAME
        if not path.is_file():
            raise CheckpointError(f"gene vocabulary {path} is missing: a checkpoint needs its {TSV_NAME}")
        with open(path, newline="", encoding="utf-8") as fh:
            return cls.from_tsv(fh.read(), where=str(path))

    @classmethod
    def from_tsv(cls, text: str, where: str = TSV_NAME) -> "GeneVocabulary":
        """Parse the text of ``vocabulary.tsv`` (``where`` names it in error messages)."""
        path = where
        reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header[:4]) != TSV_COLUMNS:
            raise CheckpointError(f"{path}: the first line must be the header {' '.join(TSV_COLUMNS)}")
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            try:
                tid, gene, nf, seen = row[0], row[1], row[2], row[3]
                rows.append((int(tid), gene, float(nf) if nf.strip() else np.nan,
                             int(seen) if seen.strip() else -1))
            except (IndexError, ValueError) as exc:
                raise CheckpointError(f"{path}, line {lineno}: cannot read {row!r} ({exc})") from None
            if not 0 <= rows[-1][0] <= MAX_TOKEN_ID:
                raise CheckpointError(f"{path}, line {lineno}: token id {tid!r} is outside 0..{MAX_TOKEN_ID}")
            if not -1 <= rows[-1][3] < 2**62:
                raise CheckpointError(f"{path}, line {lineno}: n_cells_seen {seen!r} is not a cell count (or -1)")
            if math.isinf(rows[-1][2]):
                raise CheckpointError(f"{path}, line {lineno}: norm_factor {nf!r} of {gene!r} is infinite; "
                                      "give a positive number (or leave it empty for a special token)")
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        if not np.array_equal(np.sort(ids), np.arange(len(rows))):
            raise CheckpointError(f"{path}: token ids must be 0..{len(rows) - 1}, each once")
        rows.sort(key=lambda r: r[0])
        try:
            return cls([r[1] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None

    # ---------------------------------------------------------------- Geneformer

    @classmethod
    def from_geneformer(cls, token_dictionary: Union[PathLike, Mapping[str, int]],
                        gene_median_dictionary: Union[PathLike, Mapping[str, float]]) -> "GeneVocabulary":
        """The published Geneformer dictionaries (``.json``, or ``.pkl`` read by a restricted unpickler).

        Token ids are kept; the human Ensembl IDs become canonical ids (symbols via the
        bundled table). ``<cls>`` is the dictionary's own when it has one, else appended
        after the last id. Genes without a median get no factor (never matched).
        """
        tokens = _read_dictionary(token_dictionary, int, "token dictionary")
        medians = _read_dictionary(gene_median_dictionary, float, "gene median dictionary")
        where = ("the Geneformer token dictionary" if isinstance(token_dictionary, Mapping)
                 else f"the Geneformer token dictionary {token_dictionary}")
        for special in (PAD, MASK):
            if special not in tokens:
                raise CheckpointError(f"{where} has no {special} token")
        ids = np.array(list(tokens.values()), dtype=np.int64)
        if ids.min() < 0 or np.unique(ids).size != ids.size:
            raise CheckpointError(f"{where} has negative or repeated token ids")
        if int(ids.max()) >= 2 * ids.size + 1024:  # the id range sizes the vocabulary arrays
            raise CheckpointError(
                f"{where} has {ids.size} tokens but ids up to {int(ids.max())}: most ids would be unused; the "
                "dictionary is corrupt (Geneformer's ids are 0..n-1)")
        size = int(ids.max()) + 1 + (0 if CLS in tokens else 1)
        names = [f"<unused{i}>" for i in range(size)]
        nf = np.full(size, np.nan)
        keys = [k for k in tokens if not _is_special(k)]
        canon = canonical_gene_ids(keys, HUMAN)
        for key, c in zip(keys, canon, strict=True):
            i = tokens[key]
            names[i] = str(c)
            m = medians.get(key, medians.get(str(c)))
            nf[i] = np.nan if m is None or not (m > 0) else float(m)
        for key in tokens:
            if _is_special(key):
                names[tokens[key]] = key
        if CLS not in tokens:
            names[size - 1] = CLS
        return cls(names, nf)


# ---------------------------------------------------------------- restricted pickles


def _safe_dtype(spec, *args):
    dt = np.dtype(spec)
    if dt.kind not in "biuf":
        raise pickle.UnpicklingError(f"refusing numpy dtype {dt!r} in a pickle")
    return dt


def _safe_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biuf" or not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError("refusing a numpy scalar that is not a plain number")
    return np.frombuffer(bytes(data), dtype=dtype, count=1)[0].item()


def _safe_codecs_encode(text, encoding="utf-8"):
    # protocol-2 pickles store bytes (e.g. numpy scalar payloads) as _codecs.encode(str, 'latin1')
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refusing a _codecs.encode call that is not a latin1 bytes payload")
    return text.encode("latin1")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _checked_builtin(kind):
    """``kind`` (int, float, ...) as a pickle may call it: a call that fails (``int('notanint')``,
    ``dict(5)``) is an ``UnpicklingError`` that shows the call, not a raw ``ValueError``."""
    def call(*args):
        try:
            return kind(*args)
        except (TypeError, ValueError, OverflowError) as exc:
            raise pickle.UnpicklingError(
                f"the pickle calls {kind.__name__}({', '.join(_short(a) for a in args)}), which fails ({exc})"
            ) from None
    call.__name__ = kind.__name__
    return call


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, str, int, float (and numpy number scalars, as plain numbers).

    Any other class or function in the stream raises ``pickle.UnpicklingError``, so a
    malicious pickle cannot run code; a malformed one (a call that fails, a truncated
    stream) raises it too.
    """

    _BUILTINS = {"dict", "list", "str", "int", "float"}
    _PY2_NAMES = {"long": "int", "unicode": "str"}  # protocol-2 pickles name builtins as Python 2 did

    def find_class(self, module, name):
        if module == "__builtin__":
            module, name = "builtins", self._PY2_NAMES.get(name, name)
        if module == "builtins" and name in self._BUILTINS:
            return _checked_builtin(getattr(builtins, name))
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name == "scalar":
            return _safe_scalar
        if module == "numpy" and name == "dtype":
            return _safe_dtype
        if module == "_codecs" and name == "encode":
            return _safe_codecs_encode
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only plain dicts of numbers are allowed")


def restricted_load(fh) -> object:
    """``pickle.load`` through :class:`RestrictedUnpickler`; any failure is an ``UnpicklingError``."""
    try:
        return RestrictedUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError):
        raise
    except (TypeError, ValueError, AttributeError, IndexError, KeyError, OverflowError, RecursionError,
            struct_error) as exc:
        raise pickle.UnpicklingError(f"malformed pickle ({type(exc).__name__}: {exc})") from None


def _read_dictionary(source, kind, what: str) -> dict:
    if isinstance(source, Mapping):
        raw = dict(source)
        label = what
    else:
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise CheckpointError(f"{what} {path} is missing")
        try:
            if path.suffix.lower() == ".json":
                raw = json.loads(path.read_text(encoding="utf-8"))
            elif path.suffix.lower() in (".pkl", ".pickle"):
                with open(path, "rb") as fh:
                    raw = restricted_load(fh)
            else:
                raise CheckpointError(f"{path}: a {what} must be .json or .pkl")
        except (pickle.UnpicklingError, json.JSONDecodeError, EOFError, UnicodeDecodeError, RecursionError) as exc:
            raise CheckpointError(f"cannot read {what} {path}: {exc}") from None
        except OSError as exc:
            raise CheckpointError(f"cannot read {what} {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{label}: expected a dictionary, found {type(raw).__name__}")
    out = {}
    for k, v in raw.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckpointError(f"{label}: entry {_short(k)}: {_short(v)} is not a gene id -> number pair; "
                                  f"every value of a {what} must be a number")
        if not math.isfinite(v):
            raise CheckpointError(f"{label}: entry {_short(k)}: {v!r} is not a finite number; fix or remove the entry")
        if kind is int:
            if float(v) != math.floor(v):
                raise CheckpointError(f"{label}: token id {v!r} of {_short(k)} is not an integer")
            if not 0 <= v <= MAX_TOKEN_ID:
                raise CheckpointError(f"{label}: token id {int(v)} of {_short(k)} is outside 0..{MAX_TOKEN_ID}")
        out[k] = kind(v)
    return out


# ---------------------------------------------------------------- building


def build_vocabulary(adatas: Sequence, min_cells: int = 10, gene_key: Optional[str] = None,
                     species: Optional[str] = None, progress: Optional[ProgressCallback] = None,
                     cancel: CancelToken = None) -> GeneVocabulary:
    """A vocabulary from a corpus of slices: genes expressed in at least ``min_cells`` cells.

    Each slice's genes are canonicalised (its species from ``uns['source']['species']``
    or guessed, unless ``species`` is given). ``uns['source']['values']``:
    ``log_normalized`` input is ``expm1``-ed back to a linear scale first; counts and
    volume-normalised values are used as they are. The factor of a gene is the median of
    its non-zero expression / cell total * 10,000 over all corpus cells (control probes
    are neither genes nor part of the totals). Genes are ordered by canonical id.
    """

    from napari_stofm.checks import integer

    if not len(adatas):
        raise StofmInputError("build_vocabulary needs at least one slice")
    min_cells = integer(min_cells, "min_cells", minimum=1, fix="cells that must express a gene for it to enter")
    if species is not None and normalize_species(species) is None:
        raise StofmInputError(f"species {species!r} is not supported: pass 'human' or 'mouse'")
    per_gene: dict = {}
    for k, adata in enumerate(adatas):
        check_cancelled(cancel)
        report(progress, k, len(adatas), "Gene medians")
        names, _ = default_gene_names(adata, gene_key)
        sp_ = normalize_species(species) or detect_species(adata, names)
        canon = canonical_gene_ids(names, sp_)
        controls = control_probe_mask(adata)
        keep = np.flatnonzero(~controls & (canon != ""))
        if adata.X is None:
            raise StofmInputError(f"slice {k} has no expression matrix (adata.X is None)")
        M = normalize_expression(as_csr(adata.X), expression_values_kind(adata), np.flatnonzero(controls))
        genes_k, inv = np.unique(canon[keep], return_inverse=True)
        merge = sp.csr_matrix((np.ones(keep.size), (keep, inv)), shape=(canon.size, genes_k.size))
        C = sp.csc_matrix(M @ merge)
        for j, gene in enumerate(genes_k):
            vals = C.data[C.indptr[j]:C.indptr[j + 1]]
            vals = vals[vals > 0]
            if vals.size:
                per_gene.setdefault(str(gene), []).append(vals)
    report(progress, len(adatas), len(adatas), "Gene medians")
    genes, factors, seen = [], [], []
    for gene in sorted(per_gene):
        vals = np.concatenate(per_gene[gene])
        if vals.size >= min_cells:
            genes.append(gene)
            factors.append(float(np.median(vals)))
            seen.append(int(vals.size))
    if not genes:
        raise StofmInputError(
            f"no gene is expressed in at least min_cells={min_cells} cells of the {len(adatas)} slice(s): "
            f"lower min_cells or add slices")
    return GeneVocabulary.from_genes(genes, factors, seen)
