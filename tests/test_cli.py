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


def test_a_closed_pipe_ends_the_command_quietly():
    """`torchmech discover --list-systems | head -1`: no BrokenPipeError traceback."""
    import subprocess
    import sys

    code = ("import sys; from torchmech.cli import main; sys.exit(main(['discover', '--list-systems']))")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = p.stdout.readline()
    p.stdout.close()  # the reader goes away after one line
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 0 and first.strip() and "BrokenPipeError" not in err, err
