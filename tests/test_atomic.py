"""compactvl.atomic: a directory or file appears complete at its path or not at all (training checkpoints and
CompactVLM.save_pretrained write through it)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compactvl import atomic
from compactvl.atomic import HOST, pid_alive, remove_stale, write_dir_atomically, write_file_atomically


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    assert not pid_alive(p.pid)
    return p.pid


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


def test_stale_temp_entries_of_dead_processes_are_removed_and_others_kept(tmp_path):
    dead, live = dead_pid(), os.getpid()
    other_host = f".thing.tmp-{dead}.{HOST}x-ab12cd_z"  # a shared cache: a PID of another machine means nothing
    for name in (f".step-0000004.tmp-{dead}", f".model.tmp-{dead}", f".thing.tmp-{dead}.{HOST}-ab12cd_z",
                 f".step-0000002.tmp-{live}", ".notes.tmp-abc", f"step.tmp-{dead}", f".x.tmp-{dead}-TOOLONGSUFFIX",
                 f".step-0000003.old-{dead}", other_host):
        (tmp_path / name).mkdir()
        (tmp_path / name / "w").write_text("x")
    (tmp_path / f".config.yaml.tmp-{dead}").write_text("half")  # a temp file of write_file_atomically
    (tmp_path / "step-0000003").mkdir()  # the .old one above is not its only copy
    removed = remove_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([f".step-0000004.tmp-{dead}", f".model.tmp-{dead}",
                                                      f".thing.tmp-{dead}.{HOST}-ab12cd_z", f".config.yaml.tmp-{dead}",
                                                      f".step-0000003.old-{dead}"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([
        f".step-0000002.tmp-{live}", ".notes.tmp-abc", f"step.tmp-{dead}", f".x.tmp-{dead}-TOOLONGSUFFIX",
        "step-0000003", other_host])
    assert remove_stale(tmp_path / "missing") == []


def test_a_kill_between_the_two_renames_puts_the_previous_directory_back(tmp_path):
    """Replacing moves ``path`` aside to ``.path.old-PID`` before renaming the new one in: if the process dies in
    between, the next start renames the old one back (it is the only complete copy) and drops the new temp one."""
    dead = dead_pid()
    (tmp_path / f".model.old-{dead}").mkdir()
    (tmp_path / f".model.old-{dead}" / "a").write_text("1")
    (tmp_path / f".model.tmp-{dead}").mkdir()
    remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"] and (tmp_path / "model" / "a").read_text() == "1"


def test_files_and_the_directory_are_fsynced_before_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    path = tmp_path / "ckpt"
    write_dir_atomically(path, _write({"a": "1", "b": "2"}))
    tmp = str(tmp_path / f".ckpt.tmp-{os.getpid()}")
    rename = events.index(("replace", tmp, str(path)))
    synced_before = {e[1] for e in events[:rename] if e[0] == "fsync"}
    assert {f"{tmp}/a", f"{tmp}/b", tmp} <= synced_before
    assert ("fsync", str(tmp_path)) in events[rename:]  # the rename itself reaches the disk
    events.clear()
    write_file_atomically(tmp_path / "c.yaml", "c: 1\n")
    ftmp = str(tmp_path / f".c.yaml.tmp-{os.getpid()}")
    rename = events.index(("replace", ftmp, str(tmp_path / "c.yaml")))
    assert ("fsync", ftmp) in events[:rename] and ("fsync", str(tmp_path)) in events[rename:]


def test_a_directory_that_cannot_be_fsynced_is_not_an_error(tmp_path, monkeypatch):
    """Some file systems refuse fsync on a directory (EINVAL); the write still succeeds."""
    real = os.fsync

    def fsync(fd):
        if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
            raise OSError(22, "Invalid argument")
        return real(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    write_dir_atomically(tmp_path / "d", _write({"a": "1"}))
    assert (tmp_path / "d" / "a").read_text() == "1"
