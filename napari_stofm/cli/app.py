"""The ``stofm`` command: every step of the plugin, from a terminal.

    stofm embed   slice.h5ad -o embedded.h5ad          run SToFM (cell representations)
    stofm embed   a.h5ad b.h5ad ... -o OUTDIR [--scheduler local:4]   many slices (OUTDIR/<slice>.h5ad)
    stofm predict slice.h5ad -o predicted.h5ad --regions 7 [--reference ref.h5ad --label-key cell_type]
    stofm export  curated.h5ad --csv labels.csv --zarr labels.zarr
    stofm pretrain --data DIR ... -o weights/           train weights (see `stofm pretrain --help`)
    stofm info    [--checkpoint DIR]                    describe a checkpoint

Every subcommand prints ``--help`` written for a biologist; errors are one line that says
what is wrong and how to fix it (``--debug`` shows the traceback).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from napari_stofm import keys

_COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def register(fn):
        _COMMANDS[name] = fn
        return fn

    return register


def _int_type(what: str, minimum: int, kind: str):
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be {kind}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{what} must be {kind}, got {value}")
        return value
    convert.__name__ = kind  # argparse names the type in some messages
    return convert


def positive_int(what: str):
    """argparse ``type=`` for a count >= 1: ``0``, ``-5`` or ``3.7`` are argparse's one-line
    error (``argument --split-num: cells per sub-slice must be a positive integer, got 0``)."""
    return _int_type(what, 1, "a positive integer")


def nonnegative_int(what: str):
    """argparse ``type=`` for an integer >= 0."""
    return _int_type(what, 0, "an integer >= 0")


def bounded_float(what: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
                  exclusive_minimum: bool = False):
    """argparse ``type=`` for a finite number in a range (one-line error otherwise)."""
    import math

    lo = "" if minimum is None else (f"> {minimum:g}" if exclusive_minimum else f">= {minimum:g}")
    hi = "" if maximum is None else f"<= {maximum:g}"
    kind = "a number" + (f" {' and '.join(b for b in (lo, hi) if b)}" if (lo or hi) else "")

    def convert(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be {kind}, got {text!r}") from None
        if (not math.isfinite(value) or (minimum is not None and (value <= minimum if exclusive_minimum
                                                                  else value < minimum))
                or (maximum is not None and value > maximum)):
            raise argparse.ArgumentTypeError(f"{what} must be {kind}, got {text}")
        return value
    convert.__name__ = "number"
    return convert


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint", metavar="DIR", default=None,
        help="SToFM checkpoint directory (published layout: config.json, se2transformer.pth, cell_encoder/, "
        "gene vocabulary). Default: the weights bundled with napari-stofm.",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to run the model (default: a CUDA GPU when there is one, else the CPU)")


def _add_embed_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spatial-key", default="spatial", help="obsm key of the (x, y) cell positions (default: spatial)")
    p.add_argument("--gene-key", default=None,
                   help="var column holding gene symbols or Ensembl IDs, if var_names do not (default: detect)")
    p.add_argument("--split-num", type=positive_int("cells per sub-slice"), default=None, metavar="N",
                   help="cells per sub-slice, a positive integer "
                        "(default: the checkpoint's, 1000 for the published one)")
    p.add_argument("--seed", type=nonnegative_int("random seed"), default=0,
                   help="random seed for the virtual-cell clustering (default: 0)")
    p.add_argument("--values", choices=["raw_counts", "volume_normalized", "log_normalized"], default=None,
                   help="what X holds (default: uns['source']['values'], else log_normalized when uns['log1p'] is "
                   "there, else read off the values: non-integers no larger than 20 are taken as log1p data)")
    p.add_argument("--precision", choices=["float32", "bfloat16"], default="float32",
                   help="the cell encoder's arithmetic (default: float32; bfloat16 is faster on CPUs with AVX-512 "
                        "BF16 / AMX and on recent GPUs, and moves the embeddings slightly)")
    p.add_argument("--adapt", type=bounded_float("adaptation seconds", minimum=0.0), default=0.0, metavar="SECONDS",
                   help="label-free per-slice adaptation: continue the SE(2) stage's self-supervised training on "
                        "this slice for SECONDS before embedding it (default: 0, off)")


def _add_cohort_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--scheduler", metavar="ADDRESS", default=None,
        help="with several slices, where they run: 'local:N' starts N worker processes on this computer "
        "('local': one per CPU core), 'tcp://HOST:PORT' (or a dask scheduler file) uses a running dask cluster. "
        "Default: one slice after another in this process. Needs pip install 'napari-stofm[cluster]'",
    )


def _is_cohort(args) -> bool:
    """Several slices, or an existing folder as -o: one output per slice in that folder."""
    return len(args.input) > 1 or Path(args.output).is_dir()


def _cohort_printer(args):
    """Progress lines of a cohort run: one per finished slice (failures even with --quiet)."""
    def show(done: int, total: int, message: str) -> None:
        if not getattr(args, "quiet", False) or "FAILED" in message:
            print(f"[{done}/{total}] {message}", file=sys.stderr, flush=True)
    return show


def _run_cohort(args, run, after=None, **kwargs) -> int:
    """``run(slices, model, ...)`` (embed_many / predict_many) over every slice of ``args.input``,
    then ``after(report)``; 1 when any slice failed (the others are written), 130 when interrupted."""
    from napari_stofm.model.stofm import load_model

    if not args.debug:  # dask's own chatter (workers starting, connections closing) is not for the user
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_dask)
    model = load_model(args.checkpoint)  # on the CPU: each slice's task puts it on --device where it runs
    where = f"on {args.scheduler}" if args.scheduler else "one after another in this process"
    print(f"{len(args.input)} slices -> {args.output.rstrip('/')}/ ({where}); model {model}", file=sys.stderr)
    try:
        report = run(args.input, model, out_dir=args.output, client=args.scheduler, overwrite=args.overwrite,
                     progress=_cohort_printer(args), **kwargs)
    except KeyboardInterrupt:
        print(f"stofm {args.command}: interrupted; the slices finished so far are in {args.output} and are kept: "
              "run the same command again to do the rest", file=sys.stderr)
        return 130
    print(report.describe(), file=sys.stderr)
    if after is not None:
        after(report)
    return 0 if report.ok else 1


def _quiet_dask(record: logging.LogRecord) -> bool:
    """A log filter: dask's (and its web server's) records below WARNING are dropped."""
    return record.levelno >= logging.WARNING or not record.name.startswith(("distributed", "tornado", "bokeh"))


def _single_only(args, option: str, given) -> None:
    from napari_stofm.errors import StofmInputError

    if given:
        raise StofmInputError(f"{option} is for several slices written into a folder: give several slices, or an "
                              "existing folder as -o")


def _read(path: str, backed: bool = False):
    from napari_stofm.io.slices import read_slice

    return read_slice(path, backed=backed)


def _write_h5ad(adata, out: str, overwrite: bool) -> None:
    from napari_stofm.io.export import export_h5ad

    export_h5ad(adata, None, out, overwrite=overwrite)


def _load_model(args):
    from napari_stofm.model.stofm import load_model

    return load_model(args.checkpoint, device=None if args.device == "auto" else args.device)


def _embed_settings(args) -> dict:
    """The keywords of :func:`~napari_stofm.pipeline.embed.embed` the embedding options give
    (the same for one slice and for every slice of a cohort)."""
    return dict(device=None if args.device == "auto" else args.device, spatial_key=args.spatial_key,
                gene_key=args.gene_key, split_num=args.split_num, seed=args.seed, values=args.values,
                adapt=args.adapt, precision=args.precision)


def _embed(adata, model, args, progress):
    from napari_stofm.pipeline.embed import embed

    embed(adata, model, progress=progress, **_embed_settings(args))


def _check_output(path: str, overwrite: bool) -> None:
    """Refuse an existing output before any work is done (the old file is never touched)."""
    from napari_stofm.errors import StofmInputError

    out = Path(path)
    if out.exists() and not overwrite:
        raise StofmInputError(f"{out} already exists: pass --overwrite to replace it, or choose another -o")
    if not out.parent.is_dir():
        raise StofmInputError(f"cannot write {out}: the folder {out.parent} does not exist")


@command("embed")
def cmd_embed(args) -> int:
    from napari_stofm.pipeline.predict import EMBEDDING_PARTS, STAGE_EMBED
    from napari_stofm.progress import StagedProgress, TextProgress

    if _is_cohort(args):
        from napari_stofm.cohort import embed_many

        return _run_cohort(args, embed_many, **_embed_settings(args))
    _single_only(args, "--scheduler", args.scheduler)
    path = args.input[0]
    _check_output(args.output, args.overwrite)
    adata = _read(path, backed=args.backed)
    model = _load_model(args)
    print(f"{path}: {adata.n_obs} cells x {adata.n_vars} genes; model {model}", file=sys.stderr)
    overall = None if args.quiet else StagedProgress(TextProgress(), [(STAGE_EMBED, 1.0, EMBEDDING_PARTS)])
    _embed(adata, model, args, None if overall is None else overall.stage(STAGE_EMBED))
    if overall is not None:
        overall.finish("embedded")
    meta = adata.uns[keys.UNS]
    print(
        f"embedded {adata.n_obs} cells in {meta['seconds']:.1f} s ({meta['genes_matched']}/{meta['genes_total']} genes "
        f"in the vocabulary, {meta['n_subslices']} sub-slices, {meta['n_virtual_cells']} virtual cells) "
        f"-> {args.output}",
        file=sys.stderr,
    )
    _write_h5ad(adata, args.output, args.overwrite)
    return 0


@command("info")
def cmd_info(args) -> int:
    model = _load_model(args)
    cfg = model.se2.config
    enc = model.cell_encoder.config
    print(model)
    print(f"  weights: {model.source} (fingerprint {model.fingerprint})")
    print(f"  gene scale: BERT {enc.num_hidden_layers} layers, hidden {enc.hidden_size}, "
          f"vocabulary {model.vocabulary.n_genes} genes")
    print(f"  SE(2): {cfg.num_hidden_layers} layers, E={cfg.embedding_dim}, {cfg.num_attention_heads} heads, "
          f"K={cfg.gaussian_hidden_dim}")
    s = model.settings
    print(f"  sub-slices of {s.split_num} cells ({s.split_mode} split), virtual cells alpha={s.hypernode_alpha}, "
          f"at most {s.max_hypernodes}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="stofm",
        description="Run the SToFM spatial-transcriptomics foundation model on a tissue slice: cell "
        "representations, tissue regions and cell types, and export of curated labels. Input slices are "
        "AnnData .h5ad files (cell positions in obsm['spatial'] as x, y) or SpatialData .zarr folders.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("embed", help="compute SToFM cell representations (obsm['X_stofm'])",
                       description="Compute SToFM cell representations for every cell of a slice: gene-scale "
                       "embeddings in obsm['X_stofm_cell'] and final (spatial-context) ones in obsm['X_stofm']. "
                       "Several slices go into a folder, one OUTDIR/<slice name>.h5ad each; a slice that fails is "
                       "reported and the others are still done, and running the same command again only does "
                       "what is not finished. "
                       "Examples: stofm embed slice.h5ad -o slice_stofm.h5ad; "
                       "stofm embed slices/*.h5ad -o embedded/ --scheduler local:4")
    p.add_argument("input", nargs="+", metavar="SLICE",
                   help="the slice(s): .h5ad files or SpatialData .zarr folders")
    p.add_argument("-o", "--output", required=True,
                   help="where to write the .h5ad with the embeddings; with several slices, a folder (created if "
                        "missing) that gets one <slice name>.h5ad per slice")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUTPUT if it exists (several slices: replace outputs made with other weights or "
                        "settings; finished ones are always kept)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar (several slices: failed slices only)")
    p.add_argument("--backed", action="store_true",
                   help="one .h5ad slice: leave its expression matrix on disk and read it in blocks (for a slice "
                        "larger than memory; positions and embeddings are still held in memory)")
    _add_model_args(p)
    _add_embed_args(p)
    _add_cohort_args(p)

    p = sub.add_parser("info", help="describe a checkpoint (default: the bundled weights)")
    _add_model_args(p)

    for extend in _EXTENSIONS:
        extend(sub)
    return parser


# Other modules add subcommands by appending a function(subparsers) here and registering
# their handler with @command(name).
_EXTENSIONS: List[Callable] = []


def main(argv: Optional[List[str]] = None) -> int:
    import warnings

    from napari_stofm.errors import StofmError

    # Library deprecation chatter (zarr, pandas, anndata) is not for the terminal user.
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.filterwarnings("ignore", message=".*autosharding.*")
    _load_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if not getattr(args, "quiet", False) else logging.WARNING,
                        format="%(levelname)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(args.command)
            return _COMMANDS[args.command](args)
    except (StofmError, FileExistsError, FileNotFoundError) as exc:
        if args.debug:
            raise
        print(f"stofm {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"stofm {args.command}: interrupted; nothing was written", file=sys.stderr)
        return 130


def _one_line_warning(command_name: str):
    """``warnings.showwarning`` for the terminal: ``stofm CMD: warning: message``, no source line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"stofm {command_name}: warning: {message}", file=file or sys.stderr)
    return show


def _load_extensions() -> None:
    """Import the modules that contribute subcommands."""
    import importlib

    for module in ("napari_stofm.cli.predict", "napari_stofm.cli.pretrain", "napari_stofm.cli.markers"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
