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


def test_no_progress_silences_the_libraries_bars_too_and_restores_them():
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as hf_logging

    from compactvl.cli import library_progress_bars

    hf_logging.enable_progress_bar()
    hub_utils.enable_progress_bars()
    with library_progress_bars(enabled=False):
        assert not hf_logging.is_progress_bar_enabled()  # transformers' "Loading weights" bars
        assert hub_utils.are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not hub_utils.are_progress_bars_disabled()


def test_top_level_help_imports_no_command_nor_torch():
    """``compactvl --help`` lists every command with examples from one-line summaries, importing neither the
    commands nor torch / transformers (it takes a fraction of a second; the note on issue 15 has the timing)."""
    import subprocess
    import sys

    code = ("import sys, contextlib, io\n"
            "from compactvl.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf), contextlib.suppress(SystemExit):\n"
            "    main(['--help'])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'compactvl.cli.macs', 'compactvl.cli.bench') "
            "if m in sys.modules)\n"
            "print(repr(heavy)); print(buf.getvalue())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    first, _, help_text = out.stdout.partition("\n")
    assert first == "[]"
    assert all(name in help_text for name in SUBCOMMANDS) and "examples:" in help_text
    assert "compactvl eval runs/demo" in help_text


def test_an_unknown_command_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as e:
        main(["mac"])
    assert e.value.code == 2 and "invalid choice: 'mac'" in capsys.readouterr().err


def _subparsers(parser):
    return parser._subparsers._group_actions[0].choices if parser._subparsers else {}


def test_every_command_help_has_examples():
    """Each command's --help (and each `data` action's) shows at least one example command line, in plain text."""
    for name, sub in _subparsers(build_parser()).items():
        helps = [(name, sub)] + [(f"{name} {a}", p) for a, p in _subparsers(sub).items()]
        for label, p in helps:
            text = p.format_help()
            body = text.split("\n\n", 1)[1]  # after the usage block
            assert any(line.strip().startswith(f"compactvl {label.split()[0]}") for line in body.splitlines()), label
            assert "``" not in text and ":class:" not in text, f"{label}: reStructuredText markup in --help"
