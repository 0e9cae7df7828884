"""Which columns of a slice's expression matrix a gene vocabulary knows (:func:`resolve_genes`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from napari_stofm.errors import StofmInputError
from napari_stofm.genes.expression import infer_values_kind
from napari_stofm.genes.identifiers import (
    VAR_NAMES,
    canonical_gene_ids,
    control_probe_mask,
    detect_species,
    gene_name_sources,
    id_kind,
    names_for_key,
    require_species,
    var_frame,
)
from napari_stofm.genes.vocabulary import GeneVocabulary

#: below this many vocabulary genes (or this share of the panel) a slice is embedded with a
#: warning: a rank-value token sequence over 10 genes holds a few tokens per cell in sparse
#: spatial data, and with under a fifth of the panel most of what was measured is unused
MIN_MATCHED_GENES = 10
MIN_MATCHED_FRACTION = 0.2


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
    #: how ``values`` was decided (see :func:`~napari_stofm.genes.expression.infer_values_kind`)
    values_basis: str = "default"
    gene_ids: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=object))
    #: columns left out of every cell's total (blank / control probes)
    control_index: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @property
    def fraction(self) -> float:
        return self.n_matched / self.n_total if self.n_total else 0.0

    def summary(self) -> str:
        return (f"{self.n_matched} of {self.n_total} genes ({100 * self.fraction:.1f} %) matched the "
                f"vocabulary ({self.species}, {self.id_kind} IDs from {self.source})")

    @property
    def few_genes(self) -> bool:
        """True when so few genes matched that cell embeddings carry little information:
        fewer than :data:`MIN_MATCHED_GENES`, or less than :data:`MIN_MATCHED_FRACTION` of the panel."""
        return self.n_matched < MIN_MATCHED_GENES or self.fraction < MIN_MATCHED_FRACTION

    def few_genes_message(self) -> str:
        """What :attr:`few_genes` means for the user, and what to do ('' when enough matched)."""
        if not self.few_genes:
            return ""
        return (f"only {self.n_matched} of the slice's {self.n_total} genes ({100 * self.fraction:.1f} %) are in the "
                f"model's gene vocabulary (read as {self.species} {self.id_kind} IDs from {self.source}): each cell is "
                f"encoded from at most {self.n_matched} genes, so its embedding says little about it. Check gene_key= "
                "(a var column of gene symbols or Ensembl IDs) and species=, or use a checkpoint whose vocabulary "
                "covers this panel")


def _match(names: Sequence[str], vocabulary: GeneVocabulary, species: str):
    canon = canonical_gene_ids(names, species)
    tokens = vocabulary.lookup(canon)
    return canon, tokens


def _examples(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(repr(n) for n in list(names)[:k])
    return shown + (", ..." if len(names) > k else "")


def resolve_genes(adata, vocabulary: GeneVocabulary, gene_key: Optional[str] = None,
                  species: Optional[str] = None) -> GeneMatch:
    """Match a slice's genes to ``vocabulary``.

    ``adata``: an AnnData, or its var DataFrame, or a list of gene names. Identifiers are
    read from ``gene_key`` (a var column or ``'var_names'``) or, by default, from whichever
    of var_names and the var text columns matches the most vocabulary genes. ``species``
    defaults to :func:`detect_species`. Raises :class:`StofmInputError` when no gene matches.
    """
    if species is not None:
        species = require_species(species)
    is_adata = hasattr(adata, "var") and hasattr(adata, "var_names")
    var = var_frame(adata)
    n_total = var.shape[0]
    if n_total == 0:
        raise StofmInputError("the slice has no genes (var is empty): load a slice with an expression matrix")

    if gene_key is not None:
        candidates = {gene_key: names_for_key(adata, gene_key)}
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
    values, basis = infer_values_kind(adata) if is_adata else ("raw_counts", "default (no expression matrix)")
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
        values_basis=basis,
        gene_ids=canon[hit],
        control_index=np.flatnonzero(controls).astype(np.int64),
    )
