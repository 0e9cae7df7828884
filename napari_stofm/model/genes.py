"""Gene identifiers: symbols, Ensembl IDs, mouse -> human, and matching to a vocabulary.

The model's shared gene space is **human gene symbols, upper case**. Every identifier is
brought there by :func:`canonical_gene_id`:

- a gene symbol is upper-cased. For mouse this is the usual first-order ortholog
  approximation (``Gad2`` -> ``GAD2``): it is right for most one-to-one orthologs whose
  symbols agree, and it misses orthologs with non-identical symbols (and may pair genes
  that share a symbol but are not orthologs);
- an Ensembl gene ID loses its version suffix (``ENSG00000123.4`` -> ``ENSG00000123``)
  and is replaced by its symbol from the bundled table ``data/ensembl_to_symbol.tsv.gz``
  (human: HGNC approved symbols; mouse: MGI symbols, then upper-cased; see
  ``scripts/build_gene_tables.py`` for the source). An ID missing from that table stays
  an Ensembl ID and then only matches vocabularies that hold the same ID.
"""
from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from ..errors import StofmInputError

if TYPE_CHECKING:  # pragma: no cover
    from .vocabulary import GeneVocabulary

HUMAN = "human"
MOUSE = "mouse"
SPECIES = (HUMAN, MOUSE)

ID_SYMBOL = "symbol"
ID_ENSEMBL = "ensembl"

#: values kinds understood in ``adata.uns['source']['values']``
VALUE_KINDS = ("raw_counts", "volume_normalized", "log_normalized")

_DATA_DIR = Path(__file__).resolve().parent / "data"
ENSEMBL_TABLE = _DATA_DIR / "ensembl_to_symbol.tsv.gz"

_ENSEMBL_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$", re.IGNORECASE)

# blank / negative-control / unassigned codewords of MERFISH, Xenium, CosMx panels
_CONTROL_RE = re.compile(
    r"^(blank|negcontrol|neg_control|negprb|negative_?control|unassigned|deprecated|"
    r"systemcontrol|intergenic_region|antisense_)", re.IGNORECASE)
_CONTROL_COLUMNS = ("blank_probe", "control_probe", "is_control", "control")

_SPECIES_ALIASES = {
    HUMAN: {"human", "homo sapiens", "homo_sapiens", "hsapiens", "h. sapiens", "hs", "hsa", "9606"},
    MOUSE: {"mouse", "mus musculus", "mus_musculus", "mmusculus", "m. musculus", "mm", "mmu", "10090"},
}

# var columns that commonly hold gene identifiers, most preferred first
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "symbols", "feature_name",
                  "gene_name", "gene_names", "gene", "genes", "name")
ENSEMBL_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl_ids", "ensembl",
                   "feature_id", "feature_ids")
KNOWN_COLUMNS = SYMBOL_COLUMNS + ENSEMBL_COLUMNS
VAR_NAMES = "var_names"


# --------------------------------------------------------------------------- species


def normalize_species(value) -> Optional[str]:
    """``'Mus musculus'`` / ``'mouse'`` / ``10090`` -> ``'mouse'``; ``None`` when not recognised."""
    if value is None:
        return None
    key = str(value).strip().lower()
    for species, aliases in _SPECIES_ALIASES.items():
        if key in aliases:
            return species
    return None


def _require_species(value) -> str:
    species = normalize_species(value)
    if species is None:
        raise StofmInputError(
            f"species {value!r} is not supported: the model's gene space is human symbols, "
            f"reached from 'human' or 'mouse' genes; pass species='human' or species='mouse'"
        )
    return species


def detect_species(adata=None, names: Optional[Sequence[str]] = None) -> str:
    """Species of a slice (an AnnData, var DataFrame or list of names): ``uns['source']['species']``
    if present, else from the identifiers (``names``, default var_names).

    Ensembl IDs tell it by prefix (``ENSG`` human, ``ENSMUSG`` mouse). Symbols: mouse
    symbols are capitalised (``Gad2``), human ones upper case (``GAD2``); a majority of
    mixed-case symbols means mouse. Otherwise ``'human'``.
    """
    uns = getattr(adata, "uns", None)
    if isinstance(uns, Mapping):
        source = uns.get("source")
        for value in ((source.get("species") if isinstance(source, Mapping) else None), uns.get("species")):
            species = normalize_species(value)
            if species is not None:
                return species
    if names is None and adata is not None:
        names = [str(x) for x in _var_frame(adata).index]
    if names is None or len(names) == 0:
        return HUMAN
    names = [str(n) for n in names]
    ens = [n for n in names if is_ensembl_id(n)]
    if len(ens) > len(names) / 2:
        n_mouse = sum(n.upper().startswith("ENSMUSG") for n in ens)
        return MOUSE if n_mouse > len(ens) / 2 else HUMAN
    alpha = [n for n in names if any(c.isalpha() for c in n)]
    if not alpha:
        return HUMAN
    mixed = sum(_looks_mouse_symbol(n) for n in alpha)
    return MOUSE if mixed > len(alpha) / 2 else HUMAN


def _looks_mouse_symbol(name: str) -> bool:
    # 'Gad2', 'Slc32a1', 'Rik' genes ('0610005C13Rik'): a capital (or digit) first, lower case after
    letters = [c for c in name if c.isalpha()]
    return any(c.islower() for c in letters) and "orf" not in name


# --------------------------------------------------------------------------- identifiers


def is_ensembl_id(name) -> bool:
    """``True`` for an Ensembl gene ID such as ``ENSG00000141510`` or ``ENSMUSG00000020932.15``."""
    return bool(_ENSEMBL_RE.match(str(name).strip()))


def strip_ensembl_version(name: str) -> str:
    """``ENSG00000123.4`` -> ``ENSG00000123`` (upper case); other names are returned unchanged."""
    s = str(name).strip()
    m = _ENSEMBL_RE.match(s)
    if not m:
        return s
    return m.group(1).upper() + (m.group(3).upper() if m.group(3) else "")


def is_control_probe(name) -> bool:
    """``True`` for blank / negative-control / unassigned codewords (``Blank_1``,
    ``NegControlProbe_00042``, ``UnassignedCodeword_0001``, ``NegPrb3``)."""
    return bool(_CONTROL_RE.match(str(name).strip()))


def control_probe_mask(data) -> np.ndarray:
    """Bool mask of the control columns of a slice: by name, or a bool var column such as
    ``blank_probe``. These are neither tokens nor part of a cell's total."""
    var = _var_frame(data)
    mask = np.array([is_control_probe(n) for n in var.index], dtype=bool)
    for col in var.columns:
        if str(col).lower() in _CONTROL_COLUMNS and pd.api.types.is_bool_dtype(var[col].dtype):
            mask |= var[col].to_numpy(dtype=bool)
    return mask


@lru_cache(maxsize=1)
def ensembl_to_symbol_table() -> dict:
    """The bundled Ensembl gene ID -> symbol table (empty when the file is absent)."""
    if not ENSEMBL_TABLE.is_file():
        return {}
    with gzip.open(ENSEMBL_TABLE, "rt", encoding="utf-8") as fh:
        lines = [ln for ln in fh.read().splitlines() if ln and not ln.startswith("#")]
    if lines and lines[0].startswith("ensembl_id\t"):
        lines = lines[1:]
    return dict(ln.split("\t", 1) for ln in lines)


def canonical_gene_id(name, species: str = HUMAN) -> str:
    """The shared-space identifier of one gene: an upper-case human symbol where possible.

    Symbols are upper-cased (mouse -> human by case; misses non-identical orthologs).
    Ensembl IDs lose their version and become their symbol via the bundled table, or stay
    a bare Ensembl ID when the table does not know them. ``species`` ('human' or 'mouse')
    is checked but both follow the same rule (the Ensembl prefix tells the table apart).
    """
    _require_species(species)
    s = str(name).strip()
    if is_ensembl_id(s):
        ens = strip_ensembl_version(s)
        symbol = ensembl_to_symbol_table().get(ens.replace("_PAR_Y", ""))
        if symbol is None or ens.endswith("_PAR_Y"):
            return ens
        return symbol.upper()
    return s.upper()


def canonical_gene_ids(names: Iterable, species: str = HUMAN) -> np.ndarray:
    """:func:`canonical_gene_id` over many names (object array)."""
    _require_species(species)
    table = ensembl_to_symbol_table()
    out = []
    for n in names:
        s = str(n).strip()
        if is_ensembl_id(s):
            ens = strip_ensembl_version(s)
            sym = None if ens.endswith("_PAR_Y") else table.get(ens)
            out.append(ens if sym is None else sym.upper())
        else:
            out.append(s.upper())
    return np.array(out, dtype=object)


def id_kind(names: Sequence) -> str:
    """``'ensembl'`` when most names are Ensembl IDs, else ``'symbol'``."""
    names = list(names)
    if not names:
        return ID_SYMBOL
    n_ens = sum(is_ensembl_id(n) for n in names)
    return ID_ENSEMBL if n_ens > len(names) / 2 else ID_SYMBOL


# --------------------------------------------------------------------------- slices


def expression_values_kind(adata) -> str:
    """What ``X`` holds: ``uns['source']['values']`` if given, ``'log_normalized'`` when scanpy's
    ``uns['log1p']`` is present, else ``'raw_counts'`` (any linear scale works the same)."""
    uns = getattr(adata, "uns", None) or {}
    source = uns.get("source")
    if isinstance(source, dict) and source.get("values") is not None:
        kind = str(source["values"])
        if kind not in VALUE_KINDS:
            raise StofmInputError(
                f"uns['source']['values'] is {kind!r}; expected one of {', '.join(VALUE_KINDS)} "
                f"(set it to say whether X holds counts, volume-normalised or log-normalised values)"
            )
        return kind
    if "log1p" in uns:
        return "log_normalized"
    return "raw_counts"


def _var_frame(data) -> pd.DataFrame:
    """A var DataFrame (index = var_names) from an AnnData, a DataFrame or a list of names."""
    if hasattr(data, "var") and hasattr(data, "var_names"):
        return data.var
    if isinstance(data, pd.DataFrame):
        return data
    if isinstance(data, pd.Index):
        return pd.DataFrame(index=data.astype(str))
    if isinstance(data, (list, tuple, np.ndarray, pd.Series)):
        return pd.DataFrame(index=pd.Index([str(x) for x in data]))
    raise StofmInputError(
        f"cannot read gene names from a {type(data).__name__}: pass an AnnData, its var DataFrame "
        f"or a list of gene names"
    )


def _string_columns(var: pd.DataFrame) -> list:
    cols = []
    for c in var.columns:
        dt = var[c].dtype
        if isinstance(dt, pd.CategoricalDtype):
            dt = dt.categories.dtype
        if dt == object or pd.api.types.is_string_dtype(dt):
            cols.append(c)
    return cols


def gene_name_sources(data) -> dict:
    """Candidate gene identifiers of a slice: ``{'var_names': [...], '<column>': [...], ...}``,
    var_names first, then the known columns, then other text columns."""
    var = _var_frame(data)
    out = {VAR_NAMES: [str(x) for x in var.index]}
    text_cols = _string_columns(var)
    known = [c for c in KNOWN_COLUMNS if c in text_cols]
    lower = {str(c).lower(): c for c in text_cols}
    known += [lower[k] for k in KNOWN_COLUMNS if k in lower and lower[k] not in known]
    others = [c for c in text_cols if c not in known]
    for c in known + others:
        out[str(c)] = ["" if pd.isna(x) else str(x) for x in var[c].to_numpy()]
    return out


def _names_for_key(data, gene_key: str) -> list:
    var = _var_frame(data)
    if gene_key in (VAR_NAMES, "index"):
        return [str(x) for x in var.index]
    if gene_key not in var.columns:
        raise StofmInputError(
            f"gene_key={gene_key!r} is not a var column (columns: {', '.join(map(str, var.columns)) or 'none'}); "
            f"pass one of them, or gene_key='var_names'"
        )
    return ["" if pd.isna(x) else str(x) for x in var[gene_key].to_numpy()]


def default_gene_names(data, gene_key: Optional[str] = None) -> tuple:
    """``(names, source)`` to build a vocabulary from, when there is no vocabulary to match yet.

    ``gene_key`` wins; otherwise var_names, except that Ensembl-ID var_names give way to a
    known symbol column (symbols are the shared space).
    """
    if gene_key is not None:
        return _names_for_key(data, gene_key), gene_key
    sources = gene_name_sources(data)
    names = sources[VAR_NAMES]
    if id_kind(names) == ID_ENSEMBL:
        for col in SYMBOL_COLUMNS:
            for key, vals in sources.items():
                if key.lower() == col and id_kind(vals) == ID_SYMBOL and any(vals):
                    return vals, key
    return names, VAR_NAMES


# --------------------------------------------------------------------------- matching


@dataclass
class GeneMatch:
    """Which columns of a slice's expression matrix the vocabulary knows.

    ``var_index[i]`` is a column of ``X``, ``token_ids[i]`` its vocabulary token and
    ``norm_factors[i]`` that token's normalisation factor. Several columns may share one
    token (e.g. two Ensembl IDs with one symbol); the tokenizer sums them.
    """

    var_index: np.ndarray
    token_ids: np.ndarray
    norm_factors: np.ndarray
    n_matched: int
    n_total: int
    species: str
    id_kind: str
    source: str = VAR_NAMES
    values: str = "raw_counts"
    gene_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    #: columns left out of every cell's total (blank / control probes)
    control_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_total if self.n_total else 0.0

    def summary(self) -> str:
        return (f"{self.n_matched} of {self.n_total} genes ({100 * self.fraction:.1f} %) matched the "
                f"vocabulary ({self.species}, {self.id_kind} IDs from {self.source})")


def _match(names: Sequence[str], vocabulary: "GeneVocabulary", species: str):
    canon = canonical_gene_ids(names, species)
    tokens = vocabulary.lookup(canon)
    return canon, tokens


def _examples(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:k])
    return shown + (", ..." if len(names) > k else "")


def resolve_genes(adata, vocabulary: "GeneVocabulary", gene_key: Optional[str] = None,
                  species: Optional[str] = None) -> GeneMatch:
    """Match a slice's genes to ``vocabulary``.

    ``adata``: an AnnData, or its var DataFrame, or a list of gene names. Identifiers are
    read from ``gene_key`` (a var column or ``'var_names'``) or, by default, from whichever
    of var_names and the var text columns matches the most vocabulary genes. ``species``
    defaults to :func:`detect_species`. Raises :class:`StofmInputError` when no gene matches.
    """
    if species is not None:
        species = _require_species(species)
    is_adata = hasattr(adata, "var") and hasattr(adata, "var_names")
    var = _var_frame(adata)
    n_total = var.shape[0]
    if n_total == 0:
        raise StofmInputError("the slice has no genes (var is empty): load a slice with an expression matrix")

    if gene_key is not None:
        candidates = {gene_key: _names_for_key(adata, gene_key)}
    else:
        candidates = gene_name_sources(adata)

    controls = control_probe_mask(adata)
    best = None
    for key, names in candidates.items():
        sp = species or detect_species(adata if is_adata else None, names)
        canon, tokens = _match(names, vocabulary, sp)
        tokens = np.where(controls, -1, tokens)
        n = int((tokens >= 0).sum())
        if best is None or n > best[0]:
            best = (n, key, names, sp, canon, tokens)
        if key == VAR_NAMES and n == n_total:
            break
    n, key, names, sp, canon, tokens = best

    if n == 0:
        names0 = candidates[VAR_NAMES] if VAR_NAMES in candidates else names
        where = "var_names" if key == VAR_NAMES else f"var[{key!r}]"
        tried = "" if gene_key is not None or len(candidates) == 1 else (
            f" (also tried var columns {', '.join(repr(k) for k in candidates if k != VAR_NAMES)})")
        kind = id_kind(names0)
        hint = ("pass gene_key='<column>' if gene symbols are in a var column"
                if gene_key is None else "pass another gene_key (a var column holding gene symbols or Ensembl IDs)")
        raise StofmInputError(
            f"none of the {n_total} genes in {where} (e.g. {_examples(names0 if key == VAR_NAMES else names)}; "
            f"read as {sp} {kind} IDs){tried} is in the model's gene vocabulary of {vocabulary.n_genes} genes: "
            f"{hint}, pass species= if it was guessed wrong, or use a checkpoint whose vocabulary covers this panel"
        )

    hit = np.flatnonzero(tokens >= 0)
    token_ids = tokens[hit].astype(np.int64)
    values = expression_values_kind(adata) if is_adata else "raw_counts"
    return GeneMatch(
        var_index=hit.astype(np.int64),
        token_ids=token_ids,
        norm_factors=vocabulary.norm_factors[token_ids].astype(np.float64),
        n_matched=int(hit.size),
        n_total=int(n_total),
        species=sp,
        id_kind=id_kind(names),
        source=str(key),
        values=values,
        gene_ids=canon[hit],
        control_index=np.flatnonzero(controls).astype(np.int64),
    )
