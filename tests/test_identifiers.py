"""Gene identifiers: canonical ids, Ensembl versions, species detection, control probes."""
from __future__ import annotations

import pytest
from builders import gene_adata

from napari_stofm.errors import StofmInputError
from napari_stofm.genes.identifiers import (
    canonical_gene_id,
    control_probe_mask,
    detect_species,
    ensembl_to_symbol_table,
    is_ensembl_id,
    strip_ensembl_version,
)


def test_mouse_symbols_map_to_human_by_case():
    assert canonical_gene_id("Gad2", "mouse") == "GAD2"
    assert canonical_gene_id("Slc32a1", "mouse") == "SLC32A1"
    assert canonical_gene_id("GAD2", "human") == "GAD2"


def test_ensembl_version_is_stripped_and_mapped():
    assert strip_ensembl_version("ENSG00000141510.16") == "ENSG00000141510"
    assert strip_ensembl_version("ensg00000141510.3") == "ENSG00000141510"
    assert strip_ensembl_version("GAD2") == "GAD2"
    assert is_ensembl_id("ENSMUSG00000020932.15") and not is_ensembl_id("GAD2")
    table = ensembl_to_symbol_table()
    assert len(table) > 30_000
    # TP53 and mouse Gfap, from the bundled HGNC / MGI table
    assert canonical_gene_id("ENSG00000141510.16") == "TP53"
    assert canonical_gene_id("ENSMUSG00000020932", "mouse") == "GFAP"
    # an ID the table does not know stays a bare Ensembl ID
    assert canonical_gene_id("ENSG99999999999.2") == "ENSG99999999999"


def test_unknown_species_is_refused():
    with pytest.raises(StofmInputError, match="species"):
        canonical_gene_id("Gad2", "zebrafish")


def test_species_detection():
    assert detect_species(gene_adata(["Gad2", "Vip"], species="Mus musculus")) == "mouse"
    assert detect_species(gene_adata(["GAD2", "VIP"], species="Homo sapiens")) == "human"
    assert detect_species(gene_adata(["Gad2", "Slc32a1", "Crhbp", "1110008F13Rik"])) == "mouse"
    assert detect_species(gene_adata(["GAD2", "SLC32A1", "C1orf112"])) == "human"
    assert detect_species(gene_adata(["ENSMUSG00000020932", "ENSMUSG00000000001"])) == "mouse"
    assert detect_species(gene_adata(["ENSG00000141510", "ENSG00000000003"])) == "human"


def test_control_probes_are_detected_by_name():
    mask = control_probe_mask(["Gad2", "Blank-3", "NegControlProbe_00042", "UnassignedCodeword_0001", "NegPrb3"])
    assert mask.tolist() == [False, True, True, True, True]
