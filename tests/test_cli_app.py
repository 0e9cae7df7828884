"""The ``stofm`` command itself: errors are one line, without a traceback."""
from __future__ import annotations

from napari_stofm.cli.app import main as cli_main


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.h5ad"
    assert cli_main(["embed", str(missing), "-o", str(tmp_path / "o.h5ad")]) == 1
    err = capsys.readouterr().err
    assert "nope.h5ad" in err and "Traceback" not in err
