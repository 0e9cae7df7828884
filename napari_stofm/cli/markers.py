"""``stofm markers``: the top genes of each class of a labelling."""
from __future__ import annotations

import sys

from napari_stofm import keys
from napari_stofm.cli import app as cli
from napari_stofm.cli.app import _check_output, command, positive_int


def _add_parser(sub) -> None:
    p = sub.add_parser(
        "markers", help="marker genes of each region / cell type",
        description="Rank the genes of every class of a labelling against the other labelled cells (scanpy "
        "Wilcoxon test on log-normalised expression) and print the top genes per class, or write one row per "
        "(class, gene) to a CSV: class, gene, score, logfoldchange, pval_adj, pct_in, pct_out. "
        "Example: stofm markers predicted.h5ad --key stofm_region -n 10 --csv markers.csv",
    )
    p.add_argument("input", help="the slice: .h5ad file or SpatialData .zarr folder")
    p.add_argument("--key", default=keys.REGION, help=f"obs column with the labels (default {keys.REGION})")
    p.add_argument("-n", "--n-genes", type=positive_int("genes per class"), default=10,
                   help="genes per class (default 10)")
    p.add_argument("--csv", default=None, help="write the whole table to this CSV instead of printing it")
    p.add_argument("--overwrite", action="store_true", help="replace the CSV if it exists")


cli._EXTENSIONS.append(_add_parser)


@command("markers")
def cmd_markers(args) -> int:
    from napari_stofm.heads.markers import format_markers, markers

    if args.csv:
        _check_output(args.csv, args.overwrite)
    adata = cli._read(args.input)
    table = markers(adata, args.key, n_genes=args.n_genes)
    for note in table.attrs.get("notes", []):
        print(f"note: {note}", file=sys.stderr)
    if args.csv:
        from napari_stofm.io.export import write_table_csv

        write_table_csv(table, args.csv, overwrite=args.overwrite)
        n_classes = table["class"].nunique()
        print(f"wrote {len(table)} rows ({n_classes} classes) to {args.csv}", file=sys.stderr)
        return 0
    text = format_markers(table, args.n_genes)
    print("\n".join(line for line in text.splitlines() if not line.startswith("note: ")))
    return 0
