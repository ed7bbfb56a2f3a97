"""moevl.atomic: a failed write leaves no file and no temporary; files get the umask's mode; output
paths are checked without creating anything; directories are replaced whole or merged, marker last."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moevl.atomic import atomic_directory, atomic_savefig, atomic_write_json, atomic_write_to, check_writable


def _umask_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def test_atomic_write_to_never_leaves_partial_files(tmp_path):
    target = tmp_path / "out.bin"

    def failing(tmp):
        Path(tmp).write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write_to(target, failing)
    assert not list(tmp_path.iterdir())
    target.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write_to(target, failing)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.bin"]
    atomic_write_to(target, lambda tmp: Path(tmp).write_text("done"))
    assert target.read_text() == "done"
    assert target.stat().st_mode & 0o777 == _umask_mode()  # not mkstemp's private 0o600


def test_atomic_json_gets_the_umask_mode(tmp_path):
    path = atomic_write_json(tmp_path / "sub" / "a.json", {"x": 1})
    assert path.read_text().replace(" ", "").replace("\n", "") == '{"x":1}'
    assert path.stat().st_mode & 0o777 == _umask_mode()


def test_atomic_savefig_writes_a_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    path = atomic_savefig(fig, tmp_path / "f.png", dpi=20)
    plt.close(fig)
    assert path.read_bytes()[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_check_writable_creates_nothing_and_names_the_path(tmp_path):
    assert check_writable(tmp_path / "a" / "b" / "c.json") == tmp_path / "a" / "b" / "c.json"
    assert check_writable(tmp_path / "new_dir", directory=True) == tmp_path / "new_dir"
    assert not list(tmp_path.iterdir())
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        check_writable(blocker / "c.json")
    with pytest.raises(ValueError, match="which is a directory"):
        check_writable(tmp_path)
    with pytest.raises(ValueError, match="which is a file"):
        check_writable(blocker, directory=True)
    assert check_writable(blocker) == blocker  # an existing file may be replaced


def test_atomic_directory_replaces_whole_or_leaves_the_old_one(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_directory(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()  # nothing in place before the end
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    with pytest.raises(RuntimeError, match="crash"), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("x")
        raise RuntimeError("crash")
    with atomic_directory(target, commit=False) as tmp:  # a process that takes part but writes nothing
        (tmp / "other.txt").write_text("x")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left


def test_atomic_directory_merge_keeps_other_files_removes_stale_ones_marker_last(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    target.mkdir()
    for name in ("config.json", "weights.bin", "notes.txt", "old-weights.bin"):
        (target / name).write_text("old")

    def write(tmp):
        (tmp / "config.json").write_text("new")
        (tmp / "weights.bin").write_text("new")

    with atomic_directory(
        target, merge=True, marker="config.json", stale=lambda n: n.endswith(".bin")
    ) as tmp:
        write(tmp)
    files = {p.name: p.read_text() for p in target.iterdir()}
    assert files == {"config.json": "new", "weights.bin": "new", "notes.txt": "old"}

    replace = os.replace

    def fail_on_weights(source, destination):
        if Path(destination).name == "weights.bin":
            raise OSError("disk full")
        replace(source, destination)

    monkeypatch.setattr(os, "replace", fail_on_weights)
    with (
        pytest.raises(OSError, match="disk full"),
        atomic_directory(target, merge=True, marker="config.json") as tmp,
    ):
        write(tmp)
    # the old marker went first and the new one was not yet in: an interrupted merge is not complete-looking
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt", "weights.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary left
