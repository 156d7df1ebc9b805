"""Files and folders written whole or not at all (divmerge_pl.atomic)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from divmerge_pl.atomic import atomic_file, atomic_folder


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_file_appears_whole_with_the_umask_mode_and_replaces_the_old_one(tmp_path: Path, umask_022):
    path = tmp_path / "sub" / "out.json"
    with atomic_file(path) as tmp:
        assert tmp.parent == path.parent and not path.exists()
        tmp.write_text("first")
    assert path.read_text() == "first" and mode(path) == 0o644
    with atomic_file(path) as tmp:
        tmp.write_text("second")
    assert path.read_text() == "second"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.json"]


def test_a_file_a_library_writes_0600_still_appears_with_the_umask_mode(tmp_path: Path, umask_022):
    """safetensors' ``save_file`` replaces the temporary by a 0600 file of its own."""
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "coefficients.safetensors"
    with atomic_file(path) as tmp:
        save_file({"x": torch.zeros(2)}, str(tmp))
    assert mode(path) == 0o644


def test_an_error_while_writing_a_file_leaves_the_old_one_and_no_temporary(tmp_path: Path):
    path = tmp_path / "out.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_file(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    fresh = tmp_path / "new.json"
    with pytest.raises(RuntimeError), atomic_file(fresh) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_a_folder_appears_whole_with_the_umask_mode_and_replaces_the_old_one(tmp_path: Path, umask_022):
    folder = tmp_path / "parent" / "merged"
    with atomic_folder(folder) as tmp:
        assert tmp.parent == folder.parent and not any(tmp.iterdir()) and not folder.exists()
        (tmp / "a").mkdir()
        (tmp / "a" / "weights").write_text("1")
    assert (folder / "a" / "weights").read_text() == "1" and mode(folder) == 0o755
    with atomic_folder(folder) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in folder.iterdir()) == ["b"]  # nothing of the old folder is left
    assert sorted(p.name for p in folder.parent.iterdir()) == ["merged"]


def test_an_error_while_filling_a_folder_leaves_the_old_one_and_no_temporary(tmp_path: Path):
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "old").write_text("old")
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(folder) as tmp:
        (tmp / "deep").mkdir()
        (tmp / "deep" / "half").write_text("half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in folder.iterdir()) == ["old"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), atomic_folder(fresh) as tmp:
        (tmp / "half").write_text("half")
        raise RuntimeError("killed")
    assert not fresh.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
