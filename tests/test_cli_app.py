"""The ``stofm`` command itself: errors are one line, without a traceback."""
from __future__ import annotations

from napari_stofm.cli.app import main as cli_main


def test_cli_errors_are_one_line(tmp_path, capsys):
    missing = tmp_path / "nope.h5ad"
    assert cli_main(["embed", str(missing), "-o", str(tmp_path / "o.h5ad")]) == 1
    err = capsys.readouterr().err
    assert "nope.h5ad" in err and "Traceback" not in err


def test_help_texts_show_percent_signs_once(capsys):
    import pytest

    for command in ("demo", "predict", "embed", "export"):
        with pytest.raises(SystemExit):
            cli_main([command, "--help"])
        out = capsys.readouterr().out
        assert "%%" not in out, command
        if command == "demo":
            assert "from 20% of them" in " ".join(out.split())
