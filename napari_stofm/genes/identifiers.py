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
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from napari_stofm.errors import StofmInputError

HUMAN = "human"
MOUSE = "mouse"

ID_SYMBOL = "symbol"
ID_ENSEMBL = "ensembl"

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


def require_species(value) -> str:
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
        names = [str(x) for x in var_frame(adata).index]
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
    var = var_frame(data)
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
    require_species(species)
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
    require_species(species)
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


def var_frame(data) -> pd.DataFrame:
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
        if pd.api.types.is_object_dtype(dt) or pd.api.types.is_string_dtype(dt):
            cols.append(c)
    return cols


def gene_name_sources(data) -> dict:
    """Candidate gene identifiers of a slice: ``{'var_names': [...], '<column>': [...], ...}``,
    var_names first, then the known columns, then other text columns."""
    var = var_frame(data)
    out = {VAR_NAMES: [str(x) for x in var.index]}
    text_cols = _string_columns(var)
    known = [c for c in KNOWN_COLUMNS if c in text_cols]
    lower = {str(c).lower(): c for c in text_cols}
    known += [lower[k] for k in KNOWN_COLUMNS if k in lower and lower[k] not in known]
    others = [c for c in text_cols if c not in known]
    for c in known + others:
        out[str(c)] = ["" if pd.isna(x) else str(x) for x in var[c].to_numpy()]
    return out


def names_for_key(data, gene_key: str) -> list:
    var = var_frame(data)
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
        return names_for_key(data, gene_key), gene_key
    sources = gene_name_sources(data)
    names = sources[VAR_NAMES]
    if id_kind(names) == ID_ENSEMBL:
        for col in SYMBOL_COLUMNS:
            for key, vals in sources.items():
                if key.lower() == col and id_kind(vals) == ID_SYMBOL and any(vals):
                    return vals, key
    return names, VAR_NAMES
