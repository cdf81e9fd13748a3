"""Files written whole or not at all (`dalle_mini_impl.files.write_atomic`, used by every writer of the project)."""

from __future__ import annotations

import pytest

from dalle_mini_impl.config import RunConfig, read_config_json, save_config
from dalle_mini_impl.files import write_atomic


def test_write_atomic_makes_the_folder_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "a" / "b" / "x.bin"
    assert write_atomic(path, lambda tmp: tmp.write_bytes(b"abc")) == path
    assert path.read_bytes() == b"abc"
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.bin"]


def test_a_writer_that_fails_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "config.json"
    save_config(RunConfig(), path)
    before = path.read_bytes()

    def torn(tmp):
        tmp.write_bytes(before[:10])  # half the file, then the process is interrupted
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_atomic(path, torn)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    assert read_config_json(path) == RunConfig()  # still loads
