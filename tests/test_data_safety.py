"""Files earful writes are whole or absent (temp + rename) and get the permissions `open()` would
give: 0666 less the umask for a new file, the old mode for a replaced one (issue 12, item 16)."""

from __future__ import annotations

import os
import stat

import numpy as np
import pytest

from earful import atomic
from earful.data.manifest import Utterance, write_manifest
from earful.tokenizers.base import atomic_save_npy


@pytest.fixture
def umask():
    """Set the process's umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


WRITERS = {
    "bytes": lambda p: atomic.write_bytes(p, b"x"),
    "json": lambda p: atomic.write_json(p, {"a": 1}),
    "jsonl": lambda p: atomic.write_jsonl(p, [{"a": 1}]),
    "manifest": lambda p: write_manifest([Utterance(audio="/x.wav", text="x")], p),
    "npy": lambda p: atomic_save_npy(p, np.zeros(3)),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_new_files_get_0666_less_the_umask(tmp_path, umask, writer, mask, expected):
    umask(mask)
    path = tmp_path / f"out.{writer}"
    WRITERS[writer](path)
    with open(tmp_path / "by_open", "w"):
        pass
    assert mode(path) == mode(tmp_path / "by_open") == expected
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o077)
    path = tmp_path / "shared.json"
    atomic.write_json(path, {"v": 1})
    os.chmod(path, 0o640)
    atomic.write_json(path, {"v": 2})
    assert mode(path) == 0o640 and path.read_text().strip().endswith("}")


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "report.json"
    atomic.write_json(path, {"v": 1})
    with pytest.raises(TypeError):
        atomic.write_json(path, {"v": object()})  # not JSON: fails before anything is written
    with pytest.raises(RuntimeError), atomic.replacing(path, "w") as f:
        f.write('{"v": 3')
        raise RuntimeError("killed mid-write")
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]
