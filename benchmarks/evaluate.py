"""Evaluation harness: SToFM embeddings against baselines on every labelled shared slice.

Methods (each gives one embedding per cell; every method goes through the same heads on the
same splits, in the same run):

* ``stofm``         ``obsm['X_stofm']`` of the bundled model (or ``--checkpoint DIR``);
* ``stofm-gene``    ``obsm['X_stofm_cell']``: the gene-scale encoder alone, no SE(2) stage
                    (the paper's ablation);
* ``stofm-random``  ``X_stofm`` of a same-size, randomly initialised model with the same
                    vocabulary (``build_model(vocabulary, seed=0)``);
* ``pca``           PCA(50) of log-normalised expression (normalize_total 1e4 + log1p unless
                    the source is already log-normalised; 2,000 highly variable genes when a
                    slice has more; genes z-scored per slice);
* ``banksy``        BANKSY neighbourhood-augmented expression (pybanksy when installed,
                    lambda 0.8, k = 15, AGF order 1, else the same construction from the
                    library's kNN operator), then PCA(50).

Tasks (labels NaN = unlabelled are skipped everywhere):

* regions, unsupervised: ARI / NMI against ``obs['region']`` with K = the true number of
  regions, all methods through ``RegionClusterer(emb, xy).regions(n_regions=K)``; ``pca`` is
  also clustered with plain KMeans (``pca-kmeans``, the classic baseline);
* regions, supervised: macro-F1 of ``LabelHead`` (logistic regression) on
  ``[embedding, mean embedding of 15 spatial neighbours]`` with a seeded random 8:2 split
  of the labelled cells, and cross-slice (DLPFC: 151673-151675 -> 151676; her2st: A1-F1 ->
  G2, H1);
* cell types: accuracy and macro-F1 of ``LabelHead`` on the embedding alone, random 8:2,
  and cross-slice (MERFISH hypothalamus: animal 1 -> animal 7).

Macro-F1 averages over the classes present in the scored cells' true labels. Nothing is
tuned: every head and clusterer runs at fixed settings (library defaults; the logistic
regression capped at 200 iterations). Held-out slices (the data README's test-only list)
are never used to fit a head that is then scored on them: they get the unsupervised
region scores and are the test side of the cross-slice tasks, but no 8:2 rows.
In cross-slice tasks every method reads only the genes shared by the group's slices (the
SToFM models embed each slice restricted to them); for the baselines, highly variable genes
and PCA are fitted on the training slices only.

Run from the repository root:
    python benchmarks/evaluate.py                      # every labelled slice, writes the model card
    python benchmarks/evaluate.py --quick --no-write   # 3 small slices, smoke test
    python benchmarks/evaluate.py --slices dlpfc --json out.json
    python benchmarks/evaluate.py --training-only --checkpoint B --no-write   # an A/B row: no test slice
Embeddings are cached under ``.stofm-cache/eval/`` (per method, model and slice).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".stofm-cache" / "eval"
CARD = REPO / "napari_stofm" / "model" / "bundled" / "MODEL_CARD.md"
FALLBACK_RESULTS = REPO / "benchmarks" / "results.md"
START, END = "<!-- evaluation:start -->", "<!-- evaluation:end -->"

METHODS = ["stofm", "stofm-gene", "stofm-gene+nbr", "stofm-random", "pca", "pca+nbr", "banksy"]
#: on request only (``--methods``; in the JSON, not the card's tables): does the SE(2) output
#: smooth better than its input ("stofm+nbr" against "stofm-gene+nbr"), and does it add to it
#: ("stofm+gene": ``[X_stofm, X_stofm_cell]``)?
DIAGNOSTICS = ["stofm+nbr", "stofm+gene"]
NBR_K = 10  # "+nbr" methods: the embedding beside its mean over this many nearest cells
N_PCS = 50
N_HVG = 2000
BANKSY_LAMBDA = 0.8
BANKSY_K = 15
SEED = 0
HEAD_MAX_ITER = 200  # L-BFGS iterations of the logistic-regression head (same for every method)
TEST_FRACTION = 0.2
PAPER_DLPFC = {"8:2": 0.6535, "cross-slice": 0.6437}

# From the data README's "Held out" list: scored only, never trained or tuned on.
HELD_OUT = {
    ("visium_human_dlpfc", "151676"),
    ("st_human_her2st", "G2"),
    ("st_human_her2st", "H1"),
    ("merfish_human_lung_cancer", "tessera_warmup"),
    ("merfish_mouse_hypothalamus_3slices", "animal7_bregma-0.09"),
    ("merfish_mouse_hypothalamus_3slices", "animal7_bregma0.16"),
}


@dataclass(frozen=True)
class CrossSlice:
    task: str  # "region" or "cell_type"
    dataset: str
    train: tuple
    test: tuple


CROSS_SLICE = [
    CrossSlice("region", "visium_human_dlpfc", ("151673", "151674", "151675"), ("151676",)),
    CrossSlice("region", "st_human_her2st", ("A1", "B1", "C1", "D1", "E1", "F1"), ("G2", "H1")),
    CrossSlice("cell_type", "merfish_mouse_hypothalamus_3slices", ("animal1_bregma-0.09",),
               ("animal7_bregma-0.09", "animal7_bregma0.16")),
]
QUICK = ["starmap_mouse_visp/by3_1k", "st_human_her2st/C1", "st_human_her2st/G2"]


# ----------------------------------------------------------------------------- slices


@dataclass
class Slice:
    dataset: str
    name: str
    path: Path
    n_obs: int = 0
    adata: object = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.name}"

    @property
    def held_out(self) -> bool:
        return (self.dataset, self.name) in HELD_OUT

    def load(self):
        if self.adata is None:
            from napari_stofm.io.slices import read_slice

            self.adata = read_slice(self.path)
            self.n_obs = self.adata.n_obs
        return self.adata

    @property
    def xy(self) -> np.ndarray:
        return np.asarray(self.load().obsm["spatial"], dtype=np.float64)[:, :2]

    def labels(self, column: str) -> Optional[np.ndarray]:
        """Labels as an object array with None for unlabelled cells, or None if absent."""
        obs = self.load().obs
        if column not in obs or obs[column].notna().sum() == 0:
            return None
        values = obs[column].astype(object).to_numpy()
        return np.array([None if (v is None or (isinstance(v, float) and np.isnan(v))) else str(v)
                         for v in values], dtype=object)


def data_dir(arg: Optional[str]) -> Path:
    if arg:
        return Path(arg).expanduser().resolve()
    shared = os.environ.get("STOFM_SHARED_DIR")
    if shared:
        p = Path(shared).expanduser()
        return (p / "data" if (p / "data").is_dir() else p).resolve()
    return (REPO / ".." / "shared" / "data").resolve()


def find_slices(root: Path, filters: Sequence[str]) -> List[Slice]:
    """Every ``<dataset>/<slice>.h5ad`` with region or cell-type labels (checked on read)."""
    if not root.is_dir():
        sys.exit(f"no data directory at {root}: pass --data or set STOFM_SHARED_DIR")
    out = []
    for path in sorted(root.glob("*/*.h5ad")):
        s = Slice(path.parent.name, path.stem, path)
        if filters and not any(f in s.key for f in filters):
            continue
        out.append(s)
    return out


# -------------------------------------------------------------------------------- cache


def cached(name: str, compute: Callable[[], Dict[str, np.ndarray]], enabled: bool = True) -> Dict[str, np.ndarray]:
    path = CACHE / f"{name}.npz"
    if enabled and path.is_file():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    arrays = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return arrays


def short_hash(*parts) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:12]


SCORES_VERSION = 2  # bump when a head, split or metric changes


def cached_scores(parts: Sequence, arrays: Sequence[np.ndarray], compute: Callable[[], dict], enabled: bool) -> dict:
    """Scores of a head on given embeddings, reused while the embeddings are unchanged."""
    digest = hashlib.sha1()
    for a in arrays:
        digest.update(np.ascontiguousarray(a).tobytes())
    path = CACHE / "scores" / f"{short_hash(SCORES_VERSION, *parts, digest.hexdigest())}.json"
    if enabled and path.is_file():
        return json.loads(path.read_text())
    scores = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(scores))
    return scores


# ---------------------------------------------------------------------- SToFM methods


@dataclass
class Models:
    trained: object
    random: object
    note: str = ""


def load_models(checkpoint: Optional[str], slices: Sequence[Slice]) -> Models:
    """The evaluated model and its same-size random init (same vocabulary)."""
    from napari_stofm.errors import CheckpointError
    from napari_stofm.model.stofm import build_model, load_model

    note = ""
    try:
        trained = load_model(checkpoint)
    except CheckpointError as err:
        from napari_stofm.genes.vocabulary import build_vocabulary

        note = (f"NOTE: no trained weights ({err}); 'stofm' is a random-init model (seed 1) for a "
                "development run only - its numbers mean nothing")
        print(note, flush=True)
        vocab = build_vocabulary([s.load() for s in slices if not s.held_out] or [s.load() for s in slices])
        # The pretraining recipe's sizes and settings (255 genes per cell), so costs are realistic.
        from napari_stofm.model.stofm import PipelineSettings
        from napari_stofm.training.config import PretrainConfig

        cfg = PretrainConfig()
        trained = build_model(
            vocab, seed=1,
            encoder_config=dict(hidden_size=cfg.bert_hidden, num_hidden_layers=cfg.bert_layers,
                                num_attention_heads=cfg.bert_heads, intermediate_size=cfg.bert_intermediate,
                                max_position_embeddings=cfg.max_genes + 1),
            se2_config=dict(num_hidden_layers=cfg.se2_layers, embedding_dim=cfg.se2_dim, ffn_embedding_dim=cfg.se2_ffn,
                            num_attention_heads=cfg.se2_heads, gaussian_hidden_dim=cfg.se2_gaussians),
            settings=PipelineSettings(split_num=cfg.split_num, split_mode="spatial", max_genes=cfg.max_genes))
        trained.source = "random init (seed 1), no trained weights"
    random = build_model(trained.vocabulary, se2_config=_se2_sizes(trained), encoder_config=_encoder_sizes(trained),
                         settings=trained.settings, seed=0,
                         readout_scales=trained.readout.scales if trained.readout is not None else 2)
    return Models(trained, random, note)


def _se2_sizes(model) -> dict:
    cfg = model.se2.config
    keys = ["num_hidden_layers", "embedding_dim", "ffn_embedding_dim", "num_attention_heads", "gaussian_hidden_dim",
            "pre_layernorm", "encoder_normalize_before"]
    return {k: getattr(cfg, k) for k in keys if hasattr(cfg, k)}


def _encoder_sizes(model) -> dict:
    cfg = model.cell_encoder.config
    get = cfg.get if hasattr(cfg, "get") else (lambda k, d=None: getattr(cfg, k, d))
    keys = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "max_position_embeddings"]
    return {k: get(k) for k in keys if get(k) is not None}


def stofm_embeddings(model, s: Slice, use_cache: bool, genes: Optional[Sequence[str]] = None) -> Dict[str, np.ndarray]:
    """``{'final': X_stofm, 'cell': X_stofm_cell}`` for one slice (cached on disk); with
    ``genes``, the slice is first restricted to those genes (a cross-slice group's shared genes)."""
    from napari_stofm.pipeline.embed import embed

    def compute():
        t0 = time.perf_counter()
        adata = s.load()
        adata = (adata[:, list(genes)] if genes is not None else adata).copy()
        embed(adata, model, device="cpu")
        print(f"    embedded {s.key} ({adata.n_obs} cells) in {time.perf_counter() - t0:.0f} s", flush=True)
        return {"final": np.asarray(adata.obsm["X_stofm"], np.float32),
                "cell": np.asarray(adata.obsm["X_stofm_cell"], np.float32)}

    settings = {k: v for k, v in vars(model.settings).items() if k not in ("name", "info")}
    gene_key = "" if genes is None else f"_genes{short_hash(sorted(genes))}"
    return cached(f"stofm_{model.fingerprint}_{short_hash(sorted(settings.items()))}{gene_key}_{s.dataset}__{s.name}",
                  compute, use_cache)


def group_genes(group: Optional[Sequence[Slice]]) -> Optional[List[str]]:
    """The genes every slice of a cross-slice group measures (None for a single slice or when
    they all measure the same genes): the rule ``predict(reference=...)`` applies."""
    from napari_stofm.pipeline.predict import shared_genes

    if not group or len(group) < 2:
        return None
    return shared_genes(*(g.load() for g in group))


# ------------------------------------------------------------------- expression methods


def log_expression(adata):
    """(cells x genes) CSR of log1p(normalize_total 1e4), or the values as given when the
    source is already log-normalised (``uns['source']['values']``)."""
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X, dtype=np.float32)
    values = str(adata.uns.get("source", {}).get("values", "raw_counts"))
    if values == "log_normalized":
        return X
    totals = np.asarray(X.sum(axis=1)).ravel()
    scale = np.divide(1e4, totals, out=np.zeros_like(totals), where=totals > 0)
    X = sp.diags(scale.astype(np.float32)) @ X
    X.data = np.log1p(X.data)
    return X.tocsr()


def group_expression(slices: Sequence[Slice], train: Sequence[Slice]) -> Dict[str, np.ndarray]:
    """Log expression per slice over the genes all slices share, restricted to the highly
    variable genes of the training slices (all genes when there are at most N_HVG)."""
    import anndata as ad
    import scanpy as sc
    import scipy.sparse as sp

    genes = None
    for s in slices:
        names = list(map(str, s.load().var_names))
        genes = names if genes is None else [g for g in genes if g in set(names)]
    if not genes:
        raise RuntimeError("the slices share no gene")
    logs = {}
    for s in slices:
        a = s.load()
        idx = a.var_names.get_indexer(genes)
        logs[s.key] = log_expression(a)[:, idx]
    if len(genes) > N_HVG:
        train_ad = ad.AnnData(sp.vstack([logs[s.key] for s in train]).tocsr())
        train_ad.var_names = genes
        sc.pp.highly_variable_genes(train_ad, n_top_genes=N_HVG, flavor="seurat")
        keep = np.flatnonzero(train_ad.var["highly_variable"].to_numpy())
        logs = {k: v[:, keep] for k, v in logs.items()}
    return {k: np.asarray(v.toarray(), dtype=np.float32) for k, v in logs.items()}


def zscore(X: np.ndarray, clip: float = 10.0) -> np.ndarray:
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 1e-8, sd, 1.0)
    return np.clip(Z, -clip, clip).astype(np.float32)


def fit_pca(per_slice: Dict[str, np.ndarray], train_keys: Sequence[str]) -> Dict[str, np.ndarray]:
    """PCA(N_PCS) fitted on the training slices' rows, applied to every slice."""
    from sklearn.decomposition import PCA

    train = np.vstack([per_slice[k] for k in train_keys])
    n = min(N_PCS, train.shape[0] - 1, train.shape[1] - 1)
    pca = PCA(n_components=n, random_state=SEED, svd_solver="randomized" if min(train.shape) > 2 * n else "full")
    pca.fit(train)
    return {k: pca.transform(v).astype(np.float32) for k, v in per_slice.items()}


def banksy_features(X: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """BANKSY matrix [own, neighbour mean, AGF] (z-scored, lambda-weighted) of one slice."""
    if banksy_backend() == "pybanksy":
        import anndata as ad
        import pandas as pd
        from banksy.embed_banksy import generate_banksy_matrix
        from banksy.initialize_banksy import initialize_banksy

        a = ad.AnnData(X.copy(), obs=pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1]},
                                                  index=[str(i) for i in range(len(xy))]))
        a.obsm["spatial"] = xy.copy()
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bd = initialize_banksy(a, ("x", "y", "spatial"), num_neighbours=BANKSY_K, max_m=1,
                                   plt_edge_hist=False, plt_nbr_weights=False, plt_agf_angles=False, plt_theta=False)
            _, matrix = generate_banksy_matrix(a, bd, [BANKSY_LAMBDA], max_m=1, verbose=False)
        return np.nan_to_num(np.asarray(matrix.X, dtype=np.float32))
    # Own implementation: uniform kNN mean instead of BANKSY's Gaussian weights, no AGF.
    from napari_stofm.heads.regions import neighbor_mean_operator, spatial_neighbors

    nbr = neighbor_mean_operator(spatial_neighbors(xy, min(BANKSY_K, len(xy) - 1))) @ X
    return np.hstack([np.sqrt(1 - BANKSY_LAMBDA) * zscore(X), np.sqrt(BANKSY_LAMBDA) * zscore(np.asarray(nbr))])


_BACKEND: Optional[str] = None


def banksy_backend() -> str:
    global _BACKEND
    if _BACKEND is None:
        try:
            import banksy.embed_banksy
            import banksy.initialize_banksy  # noqa: F401

            _BACKEND = "pybanksy"
        except ImportError:  # not installed: own implementation (the backend is printed and recorded)
            _BACKEND = "own"
        except Exception as exc:  # noqa: BLE001 - a broken pybanksy install fails in any way on import; reported
            print(f"pybanksy is installed but cannot be imported ({type(exc).__name__}: {exc}); "
                  "using the own BANKSY implementation", file=sys.stderr, flush=True)
            _BACKEND = "own"
    return _BACKEND


def expression_embeddings(method: str, slices: Sequence[Slice], train: Sequence[Slice],
                          use_cache: bool) -> Dict[str, np.ndarray]:
    """``pca`` or ``banksy`` embeddings of a group of slices; HVGs and PCA from ``train``."""
    group = short_hash(method, banksy_backend() if method == "banksy" else "",
                       *[s.key for s in slices], "train", *[s.key for s in train])

    def compute():
        logs = group_expression(slices, train)
        if method == "pca":
            feats = {k: zscore(v) for k, v in logs.items()}
        else:
            feats = {s.key: banksy_features(logs[s.key], s.xy) for s in slices}
        pcs = fit_pca(feats, [s.key for s in train])
        return {k.replace("/", "__"): v for k, v in pcs.items()}

    arrays = cached(f"{method}_{group}", compute, use_cache)
    return {k.replace("__", "/"): v for k, v in arrays.items()}


class Embeddings:
    """Embeddings per (method, slice); per (method, group) for cross-slice baselines."""

    def __init__(self, models: Models, use_cache: bool):
        self.models = models
        self.use_cache = use_cache

    def get(self, method: str, s: Slice, group: Optional[Sequence[Slice]] = None,
            train: Optional[Sequence[Slice]] = None) -> np.ndarray:
        # In a cross-slice group every method sees the genes all of the group's slices measure.
        if method.endswith("+nbr"):
            return with_neighbours(self.get(method[: -len("+nbr")], s, group, train), s.xy)
        genes = group_genes(group) if method.startswith("stofm") else None
        if method == "stofm":
            return stofm_embeddings(self.models.trained, s, self.use_cache, genes)["final"]
        if method == "stofm-gene":
            return stofm_embeddings(self.models.trained, s, self.use_cache, genes)["cell"]
        if method == "stofm+gene":
            both = stofm_embeddings(self.models.trained, s, self.use_cache, genes)
            return np.hstack([both["final"], both["cell"]])
        if method == "stofm-random":
            return stofm_embeddings(self.models.random, s, self.use_cache, genes)["final"]
        if method in ("pca", "banksy"):
            group = list(group or [s])
            return expression_embeddings(method, group, list(train or group), self.use_cache)[s.key]
        raise ValueError(method)


def with_neighbours(emb: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """The "+nbr" baselines: ``[embedding, its mean over the NBR_K nearest cells]``."""
    from napari_stofm.heads.classifier import with_spatial_context

    return with_spatial_context(emb, xy, NBR_K)


# ---------------------------------------------------------------------------- metrics


def split_8_2(labels: np.ndarray, seed: int = SEED):
    """Seeded random 8:2 split of the labelled cells -> (train mask, test mask)."""
    labelled = np.flatnonzero(np.array([v is not None for v in labels]))
    rng = np.random.default_rng(seed)
    order = rng.permutation(labelled)
    n_test = int(round(TEST_FRACTION * len(order)))
    test = np.zeros(len(labels), bool)
    test[order[:n_test]] = True
    train = np.zeros(len(labels), bool)
    train[order[n_test:]] = True
    return train, test


def classification_scores(y_true: Sequence, y_pred: Sequence) -> Dict[str, float]:
    """Accuracy and macro-F1 over the classes present in ``y_true``."""
    from sklearn.metrics import accuracy_score, f1_score

    y_true, y_pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    present = sorted(set(y_true))
    return {"accuracy": float(accuracy_score(y_true, y_pred)),
            "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0))}


def clustering_scores(y_true: Sequence, codes: Sequence) -> Dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    return {"ari": float(adjusted_rand_score(y_true, codes)), "nmi": float(normalized_mutual_info_score(y_true, codes))}


# ------------------------------------------------------------------------------ heads


def region_features(emb: np.ndarray, xy: np.ndarray) -> np.ndarray:
    """Supervised region head input: embedding + mean embedding of 15 spatial neighbours."""
    from napari_stofm.heads.classifier import with_spatial_context

    return with_spatial_context(emb, xy, 15)


def fit_predict(train_feats: np.ndarray, train_labels: np.ndarray, test_feats: np.ndarray,
                categories: Sequence[str]) -> np.ndarray:
    """The shared supervised head: LabelHead (logistic regression, library defaults but max_iter)."""
    import pandas as pd

    from napari_stofm.heads.classifier import LabelHead

    labels = pd.Categorical(list(train_labels), categories=list(categories))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        head = LabelHead(spatial_context=False, max_iter=HEAD_MAX_ITER, seed=SEED).fit(train_feats, labels)
        pred = head.predict(test_feats)
    return np.asarray(pred.categories, dtype=object)[pred.codes]


def unsupervised_regions(emb: np.ndarray, xy: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    from napari_stofm.heads.regions import RegionClusterer

    mask = np.array([v is not None for v in labels])
    k = len(set(labels[mask]))
    codes = RegionClusterer(emb, xy, seed=SEED).regions(n_regions=k).codes
    return clustering_scores(labels[mask], codes[mask])


def kmeans_regions(emb: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    from sklearn.cluster import KMeans

    mask = np.array([v is not None for v in labels])
    k = len(set(labels[mask]))
    codes = KMeans(n_clusters=k, n_init=10, random_state=SEED).fit_predict(emb)
    return clustering_scores(labels[mask], codes[mask])


def embedding_kmeans(emb: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    """Regions read off the embedding itself: KMeans (K = true number of regions) on the
    standardised embedding, no spatial smoothing beyond what the embedding carries."""
    from sklearn.preprocessing import StandardScaler

    return kmeans_regions(StandardScaler().fit_transform(np.asarray(emb, dtype=np.float64)), labels)


def within_slice(feats: np.ndarray, labels: np.ndarray) -> Dict[str, float]:
    train, test = split_8_2(labels)
    cats = sorted(set(labels[train | test]))
    # Every cell's features are available to the head's scaling; only train labels are seen.
    pred = fit_predict(feats[train], labels[train], feats[test], cats)
    return classification_scores(labels[test], pred)


# ------------------------------------------------------------------------------ tasks


@dataclass
class Results:
    rows: List[dict] = field(default_factory=list)  # one per (task, method, slice)

    def add(self, task: str, method: str, s: Slice, scores: Dict[str, float], **extra):
        self.rows.append(dict(task=task, method=method, dataset=s.dataset, slice=s.name,
                              held_out=s.held_out, n_cells=s.n_obs, **scores, **extra))

    def failed(self, task: str, method: str, s: Slice, err: Exception):
        print(f"    {task} {method} {s.key}: FAILED {type(err).__name__}: {err}", flush=True)
        self.rows.append(dict(task=task, method=method, dataset=s.dataset, slice=s.name, held_out=s.held_out,
                              n_cells=s.n_obs, error=f"{type(err).__name__}: {err}"))


def run_slice_tasks(s: Slice, emb: Embeddings, methods: Sequence[str], res: Results,
                    only: Optional[Sequence[str]] = None):
    """Every within-slice task for every method (``only``: just those tasks)."""
    regions, types = s.labels("region"), s.labels("cell_type")
    # A head is never fitted on a held-out slice and then scored on it (data README).
    within = not s.held_out
    tasks = ((["regions-unsup", "regions-kmeans"] + (["regions-8:2", "regions-8:2-emb"] if within else [])
              if regions is not None else [])
             + (["celltype-8:2"] if types is not None and within else []))
    xy = s.xy

    def score(task, e, compute):
        """Scores of ``compute()`` (a head on the embeddings ``e``), cached by task, slice and ``e``."""
        return cached_scores((task, s.key), [e], compute, emb.use_cache)

    def add(task, method, e, compute):
        if only is None or task in only:
            res.add(task, method, s, score(task, e, compute))

    for method in methods:
        try:
            e = emb.get(method, s)
        except Exception as err:  # noqa: BLE001 - one method failing on one slice is a result (a FAILED row)
            for task in tasks:
                res.failed(task, method, s, err)
            continue
        # Each head is bound to this method's embeddings (e=e), not to whatever ``e`` holds later.
        if regions is not None:
            add("regions-unsup", method, e, lambda e=e: unsupervised_regions(e, xy, regions))
            add("regions-kmeans", method, e, lambda e=e: embedding_kmeans(e, regions))
            if method == "pca" and (only is None or "regions-unsup" in only):
                res.add("regions-unsup", "pca-kmeans", s,
                        score("pca-kmeans", e, lambda e=e: kmeans_regions(e, regions)))
            if within:
                add("regions-8:2", method, e, lambda e=e: within_slice(region_features(e, xy), regions))
                add("regions-8:2-emb", method, e, lambda e=e: within_slice(e, regions))
        if types is not None and within:
            add("celltype-8:2", method, e, lambda e=e: within_slice(e, types))


def run_cross_slice(cs: CrossSlice, slices: Dict[str, Slice], emb: Embeddings, methods: Sequence[str],
                    res: Results):
    train = [slices[f"{cs.dataset}/{n}"] for n in cs.train if f"{cs.dataset}/{n}" in slices]
    test = [slices[f"{cs.dataset}/{n}"] for n in cs.test if f"{cs.dataset}/{n}" in slices]
    if not train or not test:
        return
    assert not any(s.held_out for s in train), "a held-out slice in a training set"
    task = "regions-cross" if cs.task == "region" else "celltype-cross"
    column = "region" if cs.task == "region" else "cell_type"
    group = train + test
    labels = {s.key: s.labels(column) for s in group}

    def scores_for(embs: Dict[str, np.ndarray], context: bool) -> Dict[str, dict]:
        feats = {s.key: region_features(embs[s.key], s.xy) if context else embs[s.key] for s in group}
        tr_lab = np.concatenate([labels[s.key] for s in train])
        tr_feat = np.vstack([feats[s.key] for s in train])
        keep = np.array([v is not None for v in tr_lab])
        cats = sorted(set(tr_lab[keep]))
        out = {}
        for s in test:
            m = np.array([v is not None for v in labels[s.key]])
            pred = fit_predict(tr_feat[keep], tr_lab[keep], feats[s.key][m], cats)
            out[s.key] = classification_scores(labels[s.key][m], pred)
        return out

    # Regions: with spatial context (our head) and on the embedding alone (paper-style probe).
    variants = [(task, True), (task + "-emb", False)] if cs.task == "region" else [(task, False)]
    for method in methods:
        try:
            embs = {s.key: emb.get(method, s, group=group, train=train) for s in group}
        except Exception as err:  # noqa: BLE001 - one method failing on one split is a result (FAILED rows)
            for name, _ in variants:
                for s in test:
                    res.failed(name, method, s, err)
            continue
        for name, context in variants:
            try:
                # bound now (partial), so the head scores this method's embeddings with this variant
                scores = cached_scores((name, *embs), list(embs.values()), partial(scores_for, embs, context),
                                       emb.use_cache)
            except Exception as err:  # noqa: BLE001 - one head failing on one split is a result (FAILED rows)
                for s in test:
                    res.failed(name, method, s, err)
                continue
            for s in test:
                res.add(name, method, s, scores[s.key], trained_on=[t.name for t in train])


# ------------------------------------------------------------------------- profiling


def profile_largest(s: Slice, checkpoint: Optional[str]) -> dict:
    """embed + region head on a fresh process (no cache), wall time and peak RSS."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--profile-slice", str(s.path)]
    if checkpoint:
        cmd += ["--checkpoint", checkpoint]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"slice": s.key, "error": (out.stderr or out.stdout)[-500:]}
    return dict(json.loads(lines[-1]), slice=s.key)


def profile_child(path: str, checkpoint: Optional[str]) -> None:
    from napari_stofm.heads.regions import RegionClusterer
    from napari_stofm.io.slices import read_slice
    from napari_stofm.pipeline.embed import embed

    adata = read_slice(path)
    s = Slice(Path(path).parent.name, Path(path).stem, Path(path), adata.n_obs, adata)
    models = load_models(checkpoint, [s])
    k = int(adata.obs["region"].nunique()) if "region" in adata.obs and adata.obs["region"].notna().any() else 7
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    embed(adata, models.trained, device="cpu")
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    RegionClusterer(adata.obsm["X_stofm"], np.asarray(adata.obsm["spatial"])[:, :2]).regions(n_regions=k)
    t_regions = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"n_cells": int(adata.n_obs), "n_genes": int(adata.n_vars), "embed_s": round(t_embed, 2),
                      "regions_s": round(t_regions, 2), "total_s": round(t_embed + t_regions, 2),
                      "peak_rss_mb": round(peak), "rss_before_mb": round(rss0), "threads": _threads(),
                      "model": models.trained.source}))


def _threads() -> int:
    import torch

    return torch.get_num_threads()


# ---------------------------------------------------------------------------- report

TASKS = [
    ("regions-kmeans", "ari", "Regions, KMeans on the embedding: ARI"),
    ("regions-kmeans", "nmi", "Regions, KMeans on the embedding: NMI"),
    ("regions-unsup", "ari", "Regions, unsupervised: ARI"),
    ("regions-unsup", "nmi", "Regions, unsupervised: NMI"),
    ("regions-8:2", "macro_f1", "Regions, supervised 8:2: macro-F1"),
    ("regions-cross", "macro_f1", "Regions, cross-slice: macro-F1"),
    ("regions-8:2-emb", "macro_f1", "Regions, 8:2, embedding only: macro-F1"),
    ("regions-cross-emb", "macro_f1", "Regions, cross-slice, embedding only: macro-F1"),
    ("celltype-8:2", "accuracy", "Cell types 8:2: accuracy"),
    ("celltype-8:2", "macro_f1", "Cell types 8:2: macro-F1"),
    ("celltype-cross", "accuracy", "Cell types cross-slice: accuracy"),
    ("celltype-cross", "macro_f1", "Cell types cross-slice: macro-F1"),
]
PER_DATASET = {("regions-kmeans", "ari"), ("regions-unsup", "ari"), ("regions-8:2", "macro_f1"),
               ("regions-cross", "macro_f1"), ("celltype-8:2", "macro_f1"), ("celltype-cross", "macro_f1")}
METRIC_SHORT = {"ari": "ARI", "nmi": "NMI", "macro_f1": "F1", "accuracy": "acc"}
COLUMNS = ["stofm", "stofm-gene", "stofm-gene+nbr", "stofm-random", "pca", "pca+nbr", "pca-kmeans", "banksy",
           *DIAGNOSTICS]  # a diagnostic column only where it was asked for
#: the held-out slices' own rows, one per slice (the issue's per-slice verdict)
HELD_OUT_TASKS = [("regions-kmeans", "ari", "regions, KMeans on the embedding, ARI"),
                  ("regions-unsup", "ari", "regions, RegionClusterer, ARI"),
                  ("regions-cross", "macro_f1", "regions cross-slice, F1"),
                  ("celltype-cross", "macro_f1", "cell types cross-slice, F1")]


def common_slices(rows: List[dict], task: str, methods: Sequence[str]) -> List[str]:
    """Slices where every listed method has a score for ``task`` (means are over these)."""
    by = {}
    for r in rows:
        if r["task"] == task and "error" not in r:
            by.setdefault(f"{r['dataset']}/{r['slice']}", set()).add(r["method"])
    return sorted(k for k, m in by.items() if set(methods) <= m)


def means(rows: List[dict], methods: Sequence[str]) -> Dict[str, dict]:
    out = {}
    for task, metric, label in TASKS:
        present = [m for m in COLUMNS if any(r["task"] == task and r["method"] == m for r in rows)]
        core = [m for m in present if m in methods]
        keys = common_slices(rows, task, core)
        if not keys:
            continue
        cell = {}
        for m in present:
            vals = [r[metric] for r in rows if r["task"] == task and r["method"] == m and "error" not in r
                    and f"{r['dataset']}/{r['slice']}" in keys]
            if len(vals) == len(keys):
                cell[m] = float(np.mean(vals))
        out[f"{task}:{metric}"] = dict(label=label, n_slices=len(keys), slices=keys, means=cell)
    return out


def fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}"


def markdown_means(summary: Dict[str, dict]) -> str:
    cols = [c for c in COLUMNS if any(c in v["means"] for v in summary.values())]
    lines = ["| task (mean over slices) | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for v in summary.values():
        vals = v["means"]
        best = max((vals[c] for c in cols if c in vals), default=None)
        cells = []
        for c in cols:
            x = vals.get(c)
            cells.append(f"**{fmt(x)}**" if x is not None and best is not None and abs(x - best) < 1e-12 else fmt(x))
        lines.append(f"| {v['label']} | {v['n_slices']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_per_dataset(rows: List[dict]) -> str:
    cols = [c for c in COLUMNS if any(r["method"] == c for r in rows)]
    lines = ["| dataset (slices) | split | task | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    groups = {}
    for r in rows:
        if "error" in r:
            continue
        split = "held-out" if r["held_out"] else "pretraining"
        groups.setdefault((r["dataset"], split), []).append(r)
    for (dataset, split), rs in sorted(groups.items()):
        n = len({r["slice"] for r in rs})
        for task, metric, _label in TASKS:
            if (task, metric) not in PER_DATASET:
                continue
            vals = {}
            for c in cols:
                v = [r[metric] for r in rs if r["task"] == task and r["method"] == c]
                if v:
                    vals[c] = float(np.mean(v))
            if vals:
                short = f"{task} {METRIC_SHORT[metric]}"
                lines.append(f"| {dataset} ({n}) | {split} | {short} | "
                             + " | ".join(fmt(vals.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def markdown_held_out(rows: List[dict]) -> str:
    """One row per (held-out slice, task): every method's score, the best in bold, and whether
    X_stofm beats every baseline there (the random init is no baseline)."""
    cols = [c for c in COLUMNS if any(r["method"] == c for r in rows)]
    lines = ["| held-out slice | task | " + " | ".join(cols) + " | stofm wins? |",
             "|---|---|" + "---|" * (len(cols) + 1)]
    keys = sorted({(r["dataset"], r["slice"]) for r in rows if r["held_out"]})
    for dataset, name in keys:
        for task, metric, label in HELD_OUT_TASKS:
            vals = {r["method"]: r[metric] for r in rows if r["task"] == task and r["dataset"] == dataset
                    and r["slice"] == name and "error" not in r}
            if "stofm" not in vals:
                continue
            base = {m: v for m, v in vals.items() if m not in ("stofm", "stofm-random")}
            best = max(vals.values())
            wins = "yes" if all(vals["stofm"] > v for v in base.values()) else (
                "no: " + ", ".join(f"{m} {v:.3f}" for m, v in sorted(base.items(), key=lambda kv: -kv[1])
                                   if v >= vals["stofm"]))
            cells = [f"**{fmt(vals[c])}**" if c in vals and vals[c] == best else fmt(vals.get(c)) for c in cols]
            lines.append(f"| {dataset}/{name} | {label} | " + " | ".join(cells) + f" | {wins} |")
    return "\n".join(lines)


def dlpfc_figures(rows: List[dict]) -> Dict[str, dict]:
    out = {}
    for task, key in [("regions-8:2", "8:2"), ("regions-cross", "cross-slice"),
                      ("regions-8:2-emb", "8:2, embedding only"), ("regions-cross-emb", "cross-slice, embedding only")]:
        vals = {}
        for m in METHODS:
            v = [r["macro_f1"] for r in rows if r["task"] == task and r["method"] == m
                 and r["dataset"] == "visium_human_dlpfc" and "error" not in r]
            if v:
                vals[m] = float(np.mean(v))
        if vals:
            out[key] = dict(ours=vals, paper_stofm=PAPER_DLPFC[key.split(",")[0]])
    return out


def verdict(summary: Dict[str, dict]) -> str:
    """One line per main metric: SToFM against the best baseline and against its random init."""
    out = []
    for key in ["regions-kmeans:ari", "regions-unsup:ari", "regions-8:2:macro_f1", "regions-cross:macro_f1",
                "celltype-8:2:macro_f1", "celltype-cross:macro_f1"]:
        vals = summary.get(key, {}).get("means", {})
        if "stofm" not in vals:
            continue
        base = {m: v for m, v in vals.items() if m not in ("stofm", "stofm-random")}
        best = max(base, key=base.get) if base else None
        parts = [f"{summary[key]['label']}: stofm {vals['stofm']:.3f}"]
        if best:
            word = "beats" if vals["stofm"] > base[best] else "loses to"
            parts.append(f"{word} the best baseline ({best} {base[best]:.3f})")
        if "stofm-random" in vals:
            word = "above" if vals["stofm"] > vals["stofm-random"] else "below"
            parts.append(f"{word} its random init ({vals['stofm-random']:.3f})")
        out.append("- " + ", ".join(parts))
    return "\n".join(out)


def render(summary, rows, dlpfc, profile, meta) -> str:
    parts = [
        f"Evaluation (`python benchmarks/evaluate.py`, {meta['date']}): model `{meta['model']}`; "
        f"{meta['n_slices']} labelled slices from the shared data directory; seed {SEED}. "
        f"Methods: `stofm` = X_stofm; `stofm-gene` = gene-scale X_stofm_cell (no SE(2)); `stofm-random` = "
        f"same-size random-init model, same vocabulary; `+nbr` = the embedding beside its mean over the "
        f"{NBR_K} nearest cells; `pca` = PCA({N_PCS}) of log-normalised expression "
        f"({N_HVG} HVGs, genes z-scored); `pca-kmeans` = KMeans on that PCA (classic baseline, unsupervised only); "
        f"`banksy` = {'pybanksy' if meta['banksy'] == 'pybanksy' else 'own BANKSY-style implementation'} "
        f"(lambda {BANKSY_LAMBDA}, k {BANKSY_K}) then PCA({N_PCS}). Regions read off the embedding: KMeans "
        f"(K = true number of regions, 10 restarts) on the standardised embedding, no smoothing. Unsupervised "
        f"regions: every method through `RegionClusterer(emb, xy).regions(n_regions=K)`. Supervised: `LabelHead` "
        f"(logistic regression, library defaults except max_iter {HEAD_MAX_ITER}) on [embedding, mean of 15 "
        "spatial neighbours] for regions and on the "
        f"embedding for cell types; seeded random 8:2 split of the labelled cells; cross-slice: DLPFC "
        f"151673-151675 -> 151676, her2st A1-F1 -> G2, H1, MERFISH hypothalamus animal 1 -> animal 7 (2 slices). "
        f"Macro-F1 over the classes present in the scored cells. Nothing is tuned: all heads run at fixed "
        f"settings. Held-out slices never have a head fitted on them: they get unsupervised scores and are the test "
        f"side of the cross-slice tasks, with no 8:2 rows (so the lung-cancer slice, alone in its dataset, gets no "
        f"cell-type score). Means are over the slices where every method "
        f"has a score (n); bold = best in the row.",
        "",
        markdown_means(summary),
        "",
        "Held-out slices, one row per slice and task (the test set; never trained or tuned on):",
        "",
        markdown_held_out(rows),
        "",
        "SToFM against the baselines (computed from the table above):",
        "",
        verdict(summary),
        "",
    ]
    if dlpfc:
        parts += ["DLPFC region macro-F1, ours vs the paper's full SToFM (paper: random 8:2 split and "
                  "cross-slice; ours: mean of the 8:2 splits of 151673-151675 (151676 is test-only), and "
                  "151673-151675 -> 151676; our default "
                  "head sees the neighbours' mean embedding too, the 'embedding only' rows are the closer match "
                  "to the paper's probe):", "",
                  "| split | paper SToFM | " + " | ".join(METHODS) + " |", "|---|---|" + "---|" * len(METHODS)]
        for key, v in dlpfc.items():
            parts.append(f"| {key} | {v['paper_stofm']:.4f} | "
                         + " | ".join(fmt(v["ours"].get(m)) for m in METHODS) + " |")
        parts.append("")
    if profile:
        if "error" in profile:
            parts += [f"Cost on the largest slice ({profile['slice']}): profiling failed: "
                      f"{profile['error'][-200:]}", ""]
        else:
            parts += [f"Cost on the largest slice ({profile['slice']}, {profile['n_cells']} cells x "
                      f"{profile['n_genes']} "
                      f"genes, CPU, {profile['threads']} threads, fresh process, no cache): `embed` "
                      f"{profile['embed_s']:.1f} s + region head fit and K cut {profile['regions_s']:.1f} s = "
                      f"{profile['total_s']:.1f} s; peak RSS {profile['peak_rss_mb']} MB.", ""]
    errors = [r for r in rows if "error" in r]
    if errors:
        parts += ["Failures (excluded from means): " + "; ".join(
            f"{r['method']} {r['dataset']}/{r['slice']} {r['task']}: {r['error'][:120]}" for r in errors), ""]
    parts += ["Per dataset (mean over its slices; held-out slices are the data README's test-only list; the "
              "others were available to pretraining):", "", markdown_per_dataset(rows)]
    return "\n".join(parts)


def write_section(path: Path, body: str) -> Path:
    section = f"{START}\n{body}\n{END}"
    if path.is_file():
        text = path.read_text()
        if START in text and END in text:
            text = text[:text.index(START)] + section + text[text.index(END) + len(END):]
        elif "\n## Evaluation\n" in text:  # at the end of the card's Evaluation section
            start = text.index("\n## Evaluation\n") + len("\n## Evaluation\n")
            nxt = text.find("\n## ", start)
            nxt = len(text) if nxt < 0 else nxt
            text = text[:nxt].rstrip("\n") + "\n\n" + section + "\n" + text[nxt:]
        else:
            text = text.rstrip("\n") + "\n\n## Evaluation\n\n" + section + "\n"
    else:
        text = "# SToFM evaluation\n\n" + section + "\n"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=None, help="shared data dir (default ../shared/data; STOFM_SHARED_DIR honoured)")
    ap.add_argument("--checkpoint", default=None, help="checkpoint dir (default: the bundled weights)")
    ap.add_argument("--slices", nargs="*", default=[], help="substrings of 'dataset/slice' to keep")
    ap.add_argument("--quick", action="store_true", help=f"smoke test on {', '.join(QUICK)}")
    ap.add_argument("--training-only", action="store_true",
                    help="leave the held-out slices out (A/B comparisons of a recipe: never decided on the test set)")
    ap.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS + DIAGNOSTICS)
    ap.add_argument("--tasks", nargs="*", default=None, metavar="TASK",
                    help="only these within-slice tasks (e.g. regions-kmeans regions-unsup celltype-8:2; "
                         "default: all, and the cross-slice ones)")
    ap.add_argument("--json", default=None, help="write every number to this JSON file")
    ap.add_argument("--no-write", action="store_true", help="do not touch the model card")
    ap.add_argument("--card", default=None, help="markdown file to write the section into (default: model card)")
    ap.add_argument("--no-cache", action="store_true", help="recompute embeddings")
    ap.add_argument("--no-profile", action="store_true", help="skip the cost measurement on the largest slice")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile-slice", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    sys.path.insert(0, str(REPO))
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.profile_slice:
        return profile_child(args.profile_slice, args.checkpoint)

    t_start = time.perf_counter()
    root = data_dir(args.data)
    slices = find_slices(root, QUICK if args.quick else args.slices)
    if args.training_only:
        slices = [s for s in slices if not s.held_out]
    for s in slices:
        s.load()
    slices = [s for s in slices if s.labels("region") is not None or s.labels("cell_type") is not None]
    if not slices:
        sys.exit("no labelled slice matched")
    by_key = {s.key: s for s in slices}
    print(f"{len(slices)} labelled slices from {root}; held out: {', '.join(s.key for s in slices if s.held_out)}")
    models = load_models(args.checkpoint, slices)
    print(f"model: {models.trained!r}\nrandom baseline: {models.random!r}\nBANKSY backend: {banksy_backend()}",
          flush=True)
    emb = Embeddings(models, use_cache=not args.no_cache)

    res = Results()
    for s in sorted(slices, key=lambda s: s.n_obs):
        print(f"[{time.perf_counter() - t_start:6.0f} s] {s.key} ({s.n_obs} cells{', held out' if s.held_out else ''})",
              flush=True)
        run_slice_tasks(s, emb, args.methods, res, args.tasks)
    for cs in CROSS_SLICE if args.tasks is None else []:
        print(f"[{time.perf_counter() - t_start:6.0f} s] cross-slice {cs.task} {cs.dataset}", flush=True)
        run_cross_slice(cs, by_key, emb, args.methods, res)

    profile = None
    if not args.no_profile:
        largest = max(slices, key=lambda s: s.n_obs)
        print(f"[{time.perf_counter() - t_start:6.0f} s] profiling embed + regions on {largest.key}", flush=True)
        path = CACHE / f"profile_{models.trained.fingerprint}_{largest.dataset}__{largest.name}.json"
        if path.is_file() and not args.no_cache:
            profile = json.loads(path.read_text())
        else:
            profile = profile_largest(largest, args.checkpoint)
            if "error" not in profile:
                path.write_text(json.dumps(profile))

    summary = means(res.rows, args.methods)
    dlpfc = dlpfc_figures(res.rows)
    meta = dict(date=time.strftime("%Y-%m-%d"), model=_relative(str(models.trained.source)),
                model_fingerprint=models.trained.fingerprint, n_slices=len(slices), banksy=banksy_backend(),
                note=models.note, seconds=round(time.perf_counter() - t_start, 1))
    body = render(summary, res.rows, dlpfc, profile, meta)
    print()
    print(body)
    print(f"\nPaper (DLPFC region F1): SToFM {PAPER_DLPFC['8:2']} (8:2), {PAPER_DLPFC['cross-slice']} (cross-slice)")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(meta=meta, means=summary, dlpfc=dlpfc, profile=profile,
                                                   paper_dlpfc=PAPER_DLPFC, rows=res.rows), indent=1))
        print(f"wrote {args.json}")
    if not args.no_write:
        target = Path(args.card) if args.card else (CARD if CARD.is_file() else FALLBACK_RESULTS)
        print(f"wrote {write_section(target, body)}")
    print(f"done in {time.perf_counter() - t_start:.0f} s")


def _relative(path: str) -> str:
    if not os.path.isabs(path):
        return path
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return Path(path).name


if __name__ == "__main__":
    main()
