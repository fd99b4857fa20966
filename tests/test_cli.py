"""The CLI: help lists every sub-command; errors are one line naming the problem, exit code 2."""
import pytest

from compactvl.cli import SUBCOMMANDS, build_parser, main


def test_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for name in ["chat", "macs", "data"]:
        assert name in out
    assert set(build_parser()._subparsers._group_actions[0].choices) <= set(SUBCOMMANDS)


def test_chat_missing_image_fails_fast(tmp_path, capsys):
    rc = main(["chat", "--image", str(tmp_path / "missing.png"), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "image file not found" in err and "missing.png" in err and "Traceback" not in err
