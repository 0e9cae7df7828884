"""A generated, cortex-like sample slice with known regions and cell types.

``make_sample_slice`` lays cells on a jittered hexagonal lattice (about 15 um apart) in a
rectangle of tissue: four cortical-like layers (1, 2/3, 4, 5/6) over white matter, whose
boundaries undulate, plus an irregular reactive lesion. Each region has its own mix of
eight cell types; each cell type has real human marker genes, each region a mild
expression program (the lesion's reactive program, stronger). Counts are negative binomial
(gamma-Poisson) around a log-normal library size, like a targeted imaging panel. Ground
truth is in ``obs['region']`` and ``obs['cell_type']``.

The top layer and the lesion both lack excitatory neurons; their cell-type mixes and
programs are made to differ as much as neighbouring layers do, so that a region map at the
default count shows them as the two structures they are (on the bundled weights, seed 0:
every one of the six regions its own region at 6, 7 and 8 regions).

The slice is deterministic for a seed and follows the layout of the real slices
(``uns['source']``, raw counts in a CSR ``X``, (x, y) microns in ``obsm['spatial']``).
"""
from __future__ import annotations

import numpy as np

from napari_stofm import keys

REGIONS = ["Layer 1", "Layer 2/3", "Layer 4", "Layer 5/6", "White matter", "Lesion"]
REGION_COLORS = ["#e6c84f", "#79c36a", "#4fa3d9", "#7a64c8", "#b7b7b7", "#d9534f"]

CELL_TYPES = ["Excitatory neuron", "Inhibitory neuron", "Astrocyte", "Oligodendrocyte",
              "OPC", "Microglia", "Endothelial", "Pericyte"]
CELL_TYPE_COLORS = ["#1f77b4", "#ff7f0e", "#279e68", "#aa40fc", "#e377c2", "#8c564b", "#d62728", "#17becf"]

# Cell-type proportions per region (rows: REGIONS, columns: CELL_TYPES; normalised below).
# Layer 1 (few neurons, astrocytes and interneurons) and the lesion (microglia first, then
# reactive astrocytes) both lack excitatory neurons, but their mixes differ, and so do their
# programs: a region map should tell them apart.
COMPOSITION = np.array([
    # Exc   Inh   Astro Oligo OPC   Micro Endo  Peri
    [0.02, 0.30, 0.40, 0.02, 0.10, 0.04, 0.08, 0.04],  # Layer 1
    [0.58, 0.16, 0.09, 0.03, 0.05, 0.04, 0.03, 0.02],  # Layer 2/3
    [0.62, 0.13, 0.08, 0.04, 0.04, 0.04, 0.03, 0.02],  # Layer 4
    [0.48, 0.12, 0.09, 0.14, 0.05, 0.05, 0.04, 0.03],  # Layer 5/6
    [0.03, 0.02, 0.13, 0.62, 0.09, 0.06, 0.03, 0.02],  # White matter
    [0.03, 0.02, 0.28, 0.05, 0.05, 0.46, 0.08, 0.03],  # Lesion
])

MARKERS = {
    "Excitatory neuron": ["SLC17A7", "SATB2", "NRGN", "CAMK2A", "NEUROD6", "TBR1", "SNAP25",
                          "SYT1", "RBFOX3", "GRIN2B", "NEFL", "NEFM", "STX1A"],
    "Inhibitory neuron": ["GAD1", "GAD2", "SLC32A1", "PVALB", "SST", "VIP", "ADARB2", "LHX6",
                          "NPY", "CCK", "CALB2", "KIT", "SNAP25", "SYT1"],
    "Astrocyte": ["GFAP", "AQP4", "SLC1A2", "SLC1A3", "ALDH1L1", "GJA1", "SOX9", "FGFR3",
                  "ALDOC", "NDRG2", "ATP1A2", "APOE", "CLU"],
    "Oligodendrocyte": ["MBP", "PLP1", "MOBP", "MOG", "MAG", "CNP", "OPALIN", "ST18", "CLDN11",
                        "ERMN", "TF", "SOX10", "ENPP6"],
    "OPC": ["PDGFRA", "CSPG4", "OLIG1", "OLIG2", "VCAN", "GPR17", "PCDH15", "LHFPL3", "MEGF11",
            "SOX6", "BCAN", "SOX10"],
    "Microglia": ["CX3CR1", "P2RY12", "TMEM119", "CSF1R", "AIF1", "C1QA", "C1QB", "C1QC",
                  "ITGAM", "PTPRC", "TREM2", "TYROBP", "SPI1", "LAPTM5"],
    "Endothelial": ["CLDN5", "FLT1", "PECAM1", "VWF", "CDH5", "KDR", "ABCB1", "SLC2A1", "ESAM",
                    "TEK", "EMCN"],
    "Pericyte": ["PDGFRB", "RGS5", "KCNJ8", "ABCC9", "NOTCH3", "ACTA2", "MYH11", "VTN",
                 "HIGD1B", "ANPEP"],
}

# Mild programs shared by every cell of a region; layer identity genes of excitatory
# neurons are stronger (applied on top for that cell type).
REGION_PROGRAM = {
    "Layer 1": ["RELN", "LAMP5", "NDNF", "CXCL14"],
    "Layer 2/3": ["CUX2", "CUX1", "LAMP5", "CALB1", "COL5A2"],
    "Layer 4": ["RORB", "WHRN", "PCP4", "RSPO1"],
    "Layer 5/6": ["FEZF2", "BCL11B", "TLE4", "FOXP2", "SEMA3E", "THEMIS", "NR4A2", "SYT6", "CCN2"],
    "White matter": ["MOBP", "OPALIN", "KLK6", "CRYAB", "SEPTIN4"],
    "Lesion": ["SERPINA3", "CHI3L1", "CD44", "VIM", "TNC", "C3", "SPP1", "HMOX1", "LCN2", "MT2A",
               "CD68", "GPNMB", "HLA-DRA", "IFITM3"],
}
LAYER_NEURON_GENES = {r: REGION_PROGRAM[r] for r in ("Layer 2/3", "Layer 4", "Layer 5/6")}
#: how strongly the lesion's reactive program is expressed (a region program's fold is 1.6-2.6)
LESION_FOLD = 2.0

HOUSEKEEPING = ["ACTB", "GAPDH", "B2M", "RPLP0", "PPIA", "UBC", "EEF1A1", "TUBB", "HPRT1",
                "TBP", "PGK1", "SDHA", "YWHAZ", "MALAT1", "POLR2A", "GUSB", "RPL13A", "HMBS"]

SPACING_UM = 15.0  # mean distance between neighbouring cell centres
ASPECT = 1.3  # tissue width / depth
LAYER_DEPTHS = [0.12, 0.38, 0.52, 0.79]  # boundaries between the five bands (fraction of depth)


def gene_panel() -> list:
    """The ~150 real human gene symbols of the sample panel (unique, stable order)."""
    genes = []
    for group in list(MARKERS.values()) + list(REGION_PROGRAM.values()) + [HOUSEKEEPING]:
        genes.extend(group)
    return list(dict.fromkeys(genes))


def _lattice(n_cells: int, rng: np.random.Generator):
    """A jittered hexagonal lattice of exactly ``n_cells`` points; returns (xy, width, depth)."""
    area = n_cells * 1.12 * SPACING_UM**2 * np.sqrt(3) / 2
    width, depth = np.sqrt(area * ASPECT), np.sqrt(area / ASPECT)
    rows = int(np.ceil(depth / (SPACING_UM * np.sqrt(3) / 2))) + 1
    cols = int(np.ceil(width / SPACING_UM)) + 1
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    x = (c + 0.5 * (r % 2)) * SPACING_UM
    y = r * SPACING_UM * np.sqrt(3) / 2
    xy = np.column_stack([x.ravel(), y.ravel()])
    xy = xy[(xy[:, 0] <= width) & (xy[:, 1] <= depth)]
    if len(xy) < n_cells:  # tiny slices: fall back to uniform positions
        extra = rng.uniform([0, 0], [width, depth], size=(n_cells - len(xy), 2))
        xy = np.vstack([xy, extra])
    keep = np.sort(rng.choice(len(xy), size=n_cells, replace=False))
    xy = xy[keep] + rng.normal(scale=0.22 * SPACING_UM, size=(n_cells, 2))
    return xy, width, depth


def _assign_regions(xy: np.ndarray, width: float, depth: float, rng: np.random.Generator) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    phase = rng.uniform(0, 2 * np.pi, size=2)
    wave = 0.035 * depth * np.sin(2 * np.pi * x / width * 1.3 + phase[0]) \
        + 0.015 * depth * np.sin(2 * np.pi * x / width * 3.1 + phase[1])
    region = np.searchsorted(np.array(LAYER_DEPTHS) * depth, y - wave * (y / depth + 0.3))
    # an irregular lesion spanning deep layers and white matter
    centre = np.array([rng.uniform(0.55, 0.75) * width, rng.uniform(0.6, 0.75) * depth])
    angle = np.arctan2(y - centre[1], x - centre[0])
    harmonics = rng.uniform(0, 2 * np.pi, size=3)
    radius = 0.2 * min(width, depth) * (1 + 0.18 * np.sin(2 * angle + harmonics[0])
                                         + 0.10 * np.sin(3 * angle + harmonics[1])
                                         + 0.06 * np.sin(5 * angle + harmonics[2]))
    inside = np.hypot(x - centre[0], y - centre[1]) < radius
    region[inside] = REGIONS.index("Lesion")
    return region.astype(np.int64)


def _assign_cell_types(region: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    composition = COMPOSITION / COMPOSITION.sum(axis=1, keepdims=True)
    cumulative = np.cumsum(composition, axis=1)[region]
    u = rng.random(len(region))[:, None]
    return np.minimum((u > cumulative).sum(axis=1), len(CELL_TYPES) - 1)


def _expression_profiles(genes: list, rng: np.random.Generator):
    """(type_profile [types, genes], region_fold [regions, genes], layer_fold [regions, genes])."""
    index = {g: i for i, g in enumerate(genes)}
    base = rng.lognormal(mean=-1.0, sigma=0.6, size=len(genes))
    base[[index[g] for g in HOUSEKEEPING]] *= 6.0
    types = np.tile(base, (len(CELL_TYPES), 1))
    for t, cell_type in enumerate(CELL_TYPES):
        for g in MARKERS[cell_type]:
            types[t, index[g]] *= rng.uniform(12.0, 30.0)
    region_fold = np.ones((len(REGIONS), len(genes)))
    layer_fold = np.ones((len(REGIONS), len(genes)))
    for r, name in enumerate(REGIONS):
        for g in REGION_PROGRAM[name]:
            region_fold[r, index[g]] = rng.uniform(1.6, 2.6) * (LESION_FOLD if name == "Lesion" else 1.0)
        for g in LAYER_NEURON_GENES.get(name, []):
            layer_fold[r, index[g]] = rng.uniform(6.0, 12.0)
    return types, region_fold, layer_fold


def _counts(cell_type, region, genes, rng, dispersion: float = 4.0):
    types, region_fold, layer_fold = _expression_profiles(genes, rng)
    profile = types[cell_type] * region_fold[region]
    excitatory = cell_type == CELL_TYPES.index("Excitatory neuron")
    profile[excitatory] *= layer_fold[region[excitatory]]
    profile /= profile.sum(axis=1, keepdims=True)
    library = rng.lognormal(mean=np.log(220.0), sigma=0.45, size=len(cell_type))
    mean = profile * library[:, None]
    rate = rng.gamma(shape=dispersion, scale=mean / dispersion)
    return rng.poisson(rate).astype(np.float32)


def make_sample_slice(n_cells: int = 3000, seed: int = 0):
    """A generated cortex-like slice: ``n_cells`` cells, ~150 real genes, 6 regions, 8 types.

    Returns an AnnData with raw counts (CSR float32) in ``X``, (x, y) in microns in
    ``obsm['spatial']``, ground truth in ``obs['region']`` / ``obs['cell_type']`` with
    colours in ``uns``, and ``uns['source']`` describing the generation.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    n_cells = int(n_cells)
    if n_cells < 1:
        raise ValueError(f"n_cells must be at least 1, got {n_cells}.")
    rng = np.random.default_rng(seed)
    xy, width, depth = _lattice(n_cells, rng)
    region = _assign_regions(xy, width, depth, rng)
    cell_type = _assign_cell_types(region, rng)
    genes = gene_panel()
    X = sp.csr_matrix(_counts(cell_type, region, genes, rng))

    obs = pd.DataFrame(
        {
            "region": pd.Categorical.from_codes(region, categories=REGIONS),
            "cell_type": pd.Categorical.from_codes(cell_type, categories=CELL_TYPES),
        },
        index=pd.Index([f"cell_{i:05d}" for i in range(n_cells)]),
    )
    var = pd.DataFrame({"marker_of": [_marker_of(g) for g in genes]}, index=pd.Index(genes))
    adata = ad.AnnData(X=X, obs=obs, var=var)
    adata.obsm[keys.SPATIAL] = xy.astype(np.float64)
    adata.uns["region_colors"] = list(REGION_COLORS)
    adata.uns["cell_type_colors"] = list(CELL_TYPE_COLORS)
    adata.uns["source"] = _source(n_cells, seed, len(genes))
    return adata


def _marker_of(gene: str) -> str:
    owners = [t for t, markers in MARKERS.items() if gene in markers]
    owners += [f"{r} program" for r, program in REGION_PROGRAM.items() if gene in program]
    if gene in HOUSEKEEPING:
        owners.append("housekeeping")
    return "; ".join(owners)


def _source(n_cells: int, seed: int, n_genes: int) -> dict:
    from napari_stofm import __version__

    return {
        "repository": "napari-stofm (generated)",
        "path": "napari_stofm/io/sample.py",
        "commit": f"napari-stofm {__version__}",
        "paper": "",
        "technology": "generated targeted imaging panel (negative-binomial counts)",
        "species": "Homo sapiens",
        "tissue": "cortex-like tissue: four layers over white matter, plus a reactive lesion",
        "values": "raw_counts",
        "spatial_unit": "micron",
        "slice": f"sample_seed{seed}",
        "spatial_note": f"jittered hexagonal lattice, ~{SPACING_UM:g} um between cells; y = depth from the pia",
        "notes": f"{n_cells} cells x {n_genes} genes, generated by make_sample_slice(n_cells={n_cells}, seed={seed}); "
                 "ground truth in obs['region'] and obs['cell_type'].",
    }
