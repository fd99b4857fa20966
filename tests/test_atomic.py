"""compactvl.atomic: a directory or file appears complete at its path or not at all (training checkpoints and
CompactVLM.save_pretrained write through it)."""
from __future__ import annotations

import os

import pytest

from compactvl.atomic import write_dir_atomically, write_file_atomically


def _write(files: dict[str, str], fail_after: int | None = None):
    def write(tmp):
        for i, (name, text) in enumerate(files.items()):
            if fail_after is not None and i == fail_after:
                raise OSError(28, "No space left on device")
            (tmp / name).write_text(text)
    return write


def test_a_directory_is_replaced_only_after_a_successful_write(tmp_path):
    path = tmp_path / "sub" / "ckpt"
    assert write_dir_atomically(path, _write({"a": "1", "b": "2"})) == path
    assert sorted(p.name for p in path.iterdir()) == ["a", "b"]
    with pytest.raises(OSError, match="No space"):
        write_dir_atomically(path, _write({"a": "new", "c": "3"}, fail_after=1))
    assert (path / "a").read_text() == "1" and not (path / "c").exists()  # the old one, untouched
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]  # no temp leftovers
    write_dir_atomically(path, _write({"c": "3"}))
    assert sorted(p.name for p in path.iterdir()) == ["c"]  # replaced as a whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt"]


def test_a_failed_rename_puts_the_previous_directory_back(tmp_path, monkeypatch):
    path = tmp_path / "model"
    write_dir_atomically(path, _write({"a": "1"}))
    real = os.replace

    def replace(src, dst):
        if str(src).endswith(f".tmp-{os.getpid()}"):
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="cross-device"):
        write_dir_atomically(path, _write({"b": "2"}))
    assert (path / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_a_file_is_written_whole_or_not_at_all(tmp_path):
    path = tmp_path / "config.yaml"
    write_file_atomically(path, "a: 1\n")
    write_file_atomically(path, b"a: 2\n")
    assert path.read_text() == "a: 2\n"
    with pytest.raises(OSError):
        write_file_atomically(tmp_path / "missing" / "x.yaml", "a: 3\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
