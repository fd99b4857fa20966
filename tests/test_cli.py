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


def test_version(capsys):
    import compactvl

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"compactvl {compactvl.__version__}"


def test_no_progress_silences_the_libraries_bars_too():
    from transformers.utils import logging as hf_logging

    from compactvl.cli import _silence_library_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    try:
        _silence_library_progress_bars()
        assert not hf_logging.is_progress_bar_enabled()  # transformers' "Loading weights" bars
    finally:
        hf_logging.enable_progress_bar()
        from huggingface_hub.utils import enable_progress_bars
        enable_progress_bars()
