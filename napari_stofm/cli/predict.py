"""``stofm predict``, ``stofm export`` and ``stofm demo``."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from napari_stofm import keys
from napari_stofm.cli import app as cli
from napari_stofm.cli.app import (
    _add_cohort_args,
    _add_embed_args,
    _add_model_args,
    _check_output,
    _embed_settings,
    _is_cohort,
    _load_model,
    _run_cohort,
    _single_only,
    bounded_float,
    command,
    positive_int,
)

ANNOTATION_KEYS = keys.PREDICTED_KEYS


def _add_parsers(sub) -> None:
    p = sub.add_parser(
        "predict", help="predict tissue regions and cell types",
        description="Run SToFM on a slice and predict tissue regions (unsupervised, --regions K) and/or labels "
        "learned from a labelled reference slice (--reference REF.h5ad --label-key cell_type) or from the "
        "slice's own partial labels (--label-key KEY without --reference). Writes obs['stofm_region'], "
        "obs['stofm_cell_type'] with _confidence columns and colours in uns. "
        "Several slices go into a folder, one OUTDIR/<slice name>.h5ad each, with a table of the cells per "
        "region and cell type of every slice (OUTDIR/cohort_summary.csv); --joint-regions K gives every slice "
        "the same K regions, so that 'Region 3' is the same tissue on every slide. "
        "Examples: stofm predict slice.h5ad -o predicted.h5ad --regions 7; "
        "stofm predict slides/*.h5ad -o predicted/ --joint-regions 7 --reference atlas.h5ad --label-key cell_type",
    )
    p.add_argument("input", nargs="+", metavar="SLICE",
                   help="the slice(s): .h5ad files or SpatialData .zarr folders")
    p.add_argument("-o", "--output", required=True,
                   help="the .h5ad to write; with several slices, a folder (created if missing) that gets one "
                        "<slice name>.h5ad per slice")
    p.add_argument("--regions", type=positive_int("number of tissue regions"), default=None, metavar="K",
                   help="number of tissue regions (default 7)")
    p.add_argument("--resolution", type=bounded_float("Leiden resolution", minimum=0.0, exclusive_minimum=True),
                   default=None, help="instead of K: Leiden resolution, > 0 (larger = more regions)")
    p.add_argument("--joint-regions", type=positive_int("number of joint tissue regions"), default=None, metavar="K",
                   help="several slices: find K tissue regions on all slices together (instead of --regions, "
                        "which finds them on each slice alone), so every slice is labelled with the same regions")
    p.add_argument("--joint-sample", type=positive_int("cells for the joint regions"), default=None,
                   metavar="CELLS",
                   help="with --joint-regions: how many cells, drawn evenly from the slices, the joint regions are "
                        "fitted on (default 50000); every cell of every slice is then labelled")
    p.add_argument("--reference", default=None, metavar="REF",
                   help="a labelled slice (.h5ad/.zarr) to learn labels from (with several slices: embedded once, "
                        "and its labels transferred to every slice)")
    p.add_argument("--label-key", default=None, help="obs column with the labels to learn (in REF, or in each SLICE)")
    p.add_argument("--target", choices=["cell_type", "region"], default="cell_type",
                   help="what the learned labels are: written to obs['stofm_cell_type'] or obs['stofm_region']")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it exists (several slices: replace outputs made with other weights or "
                        "settings; finished ones are always kept)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (several slices: failed slices only)")
    _add_model_args(p)
    _add_embed_args(p)
    _add_cohort_args(p)

    p = sub.add_parser(
        "export", help="export (curated) labels to .h5ad, CSV and SpatialData",
        description="Export the stofm_region / stofm_cell_type labels of an .h5ad (as written by `stofm predict` "
        "or the napari plugin), with confidence, curated flags and provenance. Writes are atomic; an existing "
        "file is only replaced with --overwrite. "
        "Example: stofm export predicted.h5ad --csv labels.csv --zarr labels.zarr",
    )
    p.add_argument("input", help="an .h5ad with obs['stofm_region'] and/or obs['stofm_cell_type']")
    p.add_argument("--h5ad", default=None, help="write an .h5ad copy with the labels and provenance")
    p.add_argument("--csv", default=None, help="write a CSV: cell id, x, y, classes, confidence, curated")
    p.add_argument("--zarr", default=None, help="write a SpatialData .zarr whose table annotates the cell territories")
    p.add_argument("--keys", nargs="+", default=None,
                   help=f"obs columns to export (default: those of {ANNOTATION_KEYS} present)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")

    p = sub.add_parser(
        "demo", help="the whole job on the bundled sample slice and weights",
        description="Generate the sample slice, run SToFM with the bundled weights, predict tissue regions and "
        "complete the cell types from 20% of them, score both against the slice's ground truth, and write the "
        "results (.h5ad + CSV) into a folder.",
    )
    p.add_argument("-o", "--output", default="stofm-demo", help="folder for the results (default: stofm-demo)")
    p.add_argument("--n-cells", type=positive_int("cells in the sample slice"), default=3000,
                   help="cells in the generated sample slice")
    p.add_argument("--overwrite", action="store_true", help="replace existing results in the folder")
    _add_model_args(p)


cli._EXTENSIONS.append(_add_parsers)


def _progress(args):
    from napari_stofm.progress import TextProgress

    return None if getattr(args, "quiet", False) else TextProgress()


def _predict_settings(args) -> dict:
    """The keywords of :func:`~napari_stofm.pipeline.predict.predict` the options give (the same
    for one slice and for every slice of a cohort)."""
    return dict(n_regions=args.regions, resolution=args.resolution, reference=args.reference,
                label_key=args.label_key, target_key=f"stofm_{args.target}", **_embed_settings(args))


@command("predict")
def cmd_predict(args) -> int:
    from napari_stofm.pipeline.predict import predict

    if _is_cohort(args):
        return _predict_cohort(args)
    _single_only(args, "--scheduler", args.scheduler)
    _single_only(args, "--joint-regions", args.joint_regions)
    args.input = args.input[0]
    _check_output(args.output, args.overwrite)
    adata = cli._read(args.input)
    model = _load_model(args)
    result = predict(adata, model, progress=_progress(args), **_predict_settings(args))
    for key, ann in result.annotations.items():
        table = ann.summary()
        counts = ", ".join(f"{name}: {n}" for name, n in zip(table["name"], table["n_cells"], strict=True))
        print(f"{key}: {ann.n_classes} classes, mean confidence {np.nanmean(ann.confidence):.2f} ({counts})",
              file=sys.stderr)
    cli._write_h5ad(adata, args.output, args.overwrite)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _predict_cohort(args) -> int:
    from napari_stofm.cohort import predict_many
    from napari_stofm.cohort.runner import region_table

    def show_summary(report) -> None:
        table = region_table(report.summary)
        if table is not None:
            print(f"cells per tissue region:\n{table.to_string()}", file=sys.stderr)
        if report.summary_path is not None:
            print(f"wrote {report.summary_path} (cells per class per slice)", file=sys.stderr)

    return _run_cohort(args, predict_many, after=show_summary, joint_regions=args.joint_regions,
                       joint_sample=args.joint_sample, **_predict_settings(args))


def _annotations(adata, keys):
    from napari_stofm.errors import StofmInputError
    from napari_stofm.heads.annotation import Annotation

    keys = keys or [k for k in ANNOTATION_KEYS if k in adata.obs]
    if not keys:
        raise StofmInputError(
            f"no label columns to export: the file has none of {ANNOTATION_KEYS}; "
            "run `stofm predict` first or pass --keys"
        )
    return {k: Annotation.from_obs(adata, k) for k in keys}


@command("export")
def cmd_export(args) -> int:
    from napari_stofm.errors import StofmInputError
    from napari_stofm.io.export import check_export_target, export_csv, export_h5ad, export_spatialdata

    targets = [(t, fmt) for t, fmt in ((args.h5ad, "h5ad"), (args.csv, "csv"), (args.zarr, "spatialdata")) if t]
    if not targets:
        raise StofmInputError("nothing to write: give at least one of --h5ad, --csv, --zarr")
    for t, fmt in targets:  # every target is checked before any is written
        _check_output(t, args.overwrite)
        check_export_target(t, overwrite=args.overwrite, fmt=fmt)
    targets = [t for t, _ in targets]
    adata = cli._read(args.input)
    annotations = _annotations(adata, args.keys)
    if args.h5ad:
        export_h5ad(adata, annotations, args.h5ad, overwrite=args.overwrite)
    if args.csv:
        export_csv(adata, annotations, args.csv, overwrite=args.overwrite)
    if args.zarr:
        from napari_stofm.review.raster import rasterize_territories

        territories = rasterize_territories(np.asarray(adata.obsm[keys.SPATIAL])[:, :2])
        export_spatialdata(adata, annotations, args.zarr, labels=territories, overwrite=args.overwrite)
    print(f"exported {', '.join(annotations)} for {adata.n_obs} cells -> {', '.join(targets)}", file=sys.stderr)
    return 0


@command("demo")
def cmd_demo(args) -> int:
    from sklearn.metrics import adjusted_rand_score, f1_score

    from napari_stofm.heads.annotation import Annotation
    from napari_stofm.io.export import export_csv, export_h5ad
    from napari_stofm.io.sample import make_sample_slice
    from napari_stofm.pipeline.predict import predict

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    h5ad, csv = out / "sample_predicted.h5ad", out / "sample_labels.csv"
    for t in (h5ad, csv):
        _check_output(str(t), args.overwrite)
    adata = make_sample_slice(n_cells=args.n_cells, seed=0)
    truth_types = adata.obs["cell_type"].copy()
    rng = np.random.default_rng(0)
    partial = truth_types.astype(object).where(rng.random(adata.n_obs) < 0.2)
    adata.obs["cell_type_partial"] = partial.astype("category")
    model = _load_model(args)
    print(f"sample slice: {adata.n_obs} cells, {adata.n_vars} genes; model {model}", file=sys.stderr)
    n_true = adata.obs["region"].cat.categories.size
    predict(adata, model, n_regions=n_true, label_key="cell_type_partial",  # one run, one progress bar
            device=None if args.device == "auto" else args.device, progress=_progress(args))
    ari = adjusted_rand_score(adata.obs["region"], adata.obs[keys.REGION])
    hidden = partial.isna().to_numpy()
    pred_types = adata.obs[keys.CELL_TYPE].astype(str).to_numpy()[hidden]
    acc = float(np.mean(pred_types == truth_types.astype(str).to_numpy()[hidden]))
    f1 = f1_score(truth_types.astype(str).to_numpy()[hidden], pred_types, average="macro")
    annotations = {k: Annotation.from_obs(adata, k) for k in ANNOTATION_KEYS}
    export_h5ad(adata, annotations, h5ad, overwrite=args.overwrite)
    export_csv(adata, annotations, csv, overwrite=args.overwrite)
    print(f"tissue regions: {n_true} regions, ARI vs ground truth {ari:.3f}")
    print(f"cell types from 20% labels: accuracy {acc:.3f}, macro-F1 {f1:.3f} on the other 80%")
    print(f"wrote {h5ad} and {csv}")
    return 0
