"""pangu/files.py: atomic writes, paths confined to their directory, marked temporary directories."""

from __future__ import annotations

import os

import pytest

from pangu.files import (
    TMP_MARKER,
    UnsafePathError,
    atomic_writer,
    confined,
    make_marked_tmp,
    remove_marked_tmp,
    write_atomic,
)


def test_an_interrupted_atomic_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError), atomic_writer(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old"
    assert sorted(os.listdir(tmp_path)) == ["f.json"]
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new"


@pytest.mark.parametrize("name", ["/etc/passwd", "../x", "a/../../x", "a/../b", "", "a\x00b", "..\\x"])
def test_paths_outside_their_directory_are_refused(tmp_path, name):
    with pytest.raises(UnsafePathError):
        confined(tmp_path, name)


def test_a_symlink_leading_out_is_refused(tmp_path):
    (tmp_path / "root").mkdir()
    (tmp_path / "outside").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path / "outside")
    with pytest.raises(UnsafePathError, match="symbolic link"):
        confined(tmp_path / "root", "link/file")
    assert confined(tmp_path / "root", "sub/file") == tmp_path / "root" / "sub" / "file"


def test_only_marked_temporary_directories_are_removed(tmp_path):
    users = tmp_path / ".tmp_out"
    users.mkdir()
    (users / "precious").write_text("mine")
    with pytest.raises(FileExistsError, match="not made by pangu"):
        make_marked_tmp(users)
    assert (users / "precious").read_text() == "mine"
    ours = make_marked_tmp(tmp_path / ".tmp_other")
    assert (ours / TMP_MARKER).is_file()
    (ours / "partial").write_text("x")
    make_marked_tmp(ours)  # an interrupted attempt's leftovers are replaced
    assert sorted(p.name for p in ours.iterdir()) == [TMP_MARKER]
    remove_marked_tmp(ours)
    assert not ours.exists()
