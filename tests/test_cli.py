"""The `torchmech` command line: help, version, and every subcommand's help render."""

import pytest

import torchmech
from torchmech.cli import build_parser, main


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "discover" in out and "1% noise" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    assert "usage: torchmech" in capsys.readouterr().out


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchmech {torchmech.__version__}"


def test_every_subcommand_help_renders(capsys):
    parser = build_parser()
    names = [a for a in parser._subparsers._group_actions[0].choices]
    assert "discover" in names
    for name in names:
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        assert f"usage: torchmech {name}" in capsys.readouterr().out
