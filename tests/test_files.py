"""Files written whole or not at all (`dalle_mini_impl.files.write_atomic`, used by every writer of the project)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dalle_mini_impl.config import RunConfig, read_config_json, save_config
from dalle_mini_impl.errors import UserError
from dalle_mini_impl.files import read_json_object, write_atomic


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


def test_two_writers_of_one_file_each_rename_a_whole_file(tmp_path):
    """With one temporary name for every writer, a second writer renamed the first's half-written file into place
    (a torn config.json for readers) and the first failed with a FileNotFoundError (two train.encode on one run
    folder: a traceback). Each writer's temporary file is its own."""
    import threading

    path = tmp_path / "config.json"
    started, errors = threading.Barrier(2), []

    def writer(text: str) -> None:
        def write(tmp):
            tmp.write_text(text[:5])
            started.wait(timeout=10)  # both are half-way through their writes at once
            with open(tmp, "a") as f:
                f.write(text[5:])

        try:
            write_atomic(path, write)
        except BaseException as e:  # noqa: BLE001 - what the old temporary name raised
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(text,)) for text in ('{"a": 1111}', '{"b": 2222}')]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and path.read_text() in ('{"a": 1111}', '{"b": 2222}')
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_two_stages_recording_their_sections_at_once_keep_each_others(tmp_path, monkeypatch):
    """record_stage_config reads the run's config.json, puts its stage's sections in and writes it back: two
    stages of one run ending together (dalle and clip) each wrote back the file as it read it, losing the other's
    sections. The read-change-write holds a lock."""
    import dataclasses
    import threading
    import time

    from dalle_mini_impl.pipeline import bundle

    save_config(RunConfig(), tmp_path / "config.json")
    reading = bundle.read_config_json

    def slow_read(path):  # both stages read before either writes, unless the lock keeps them apart
        value = reading(path)
        time.sleep(0.3)
        return value

    monkeypatch.setattr(bundle, "read_config_json", slow_read)
    base = RunConfig()
    dalle = dataclasses.replace(base, transformer=dataclasses.replace(base.transformer, dim=96))
    clip = dataclasses.replace(base, clip=dataclasses.replace(base.clip, embed_dim=48))
    threads = [
        threading.Thread(target=bundle.record_stage_config, args=(c, tmp_path, s))
        for c, s in ((dalle, "dalle"), (clip, "clip"))
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    written = read_config_json(tmp_path / "config.json")
    assert (written.transformer.dim, written.clip.embed_dim) == (96, 48)


def test_read_json_object_names_the_file_and_the_fix_for_each_way_it_can_be_wrong(tmp_path):
    good = tmp_path / "good.json"
    good.write_text('{"a": [1, 2]}')
    assert read_json_object(good, "result", "pass another") == {"a": [1, 2]}
    cases = {
        "none.json": (None, r"result '.*none.json' does not exist; write it first$"),
        "broken.json": ('{"a": ', r"result '.*broken.json' is not valid JSON \(Expecting value\); pass another$"),
        "latin.json": (
            "\xe9".encode("latin-1"),
            r"result '.*latin.json' is not valid JSON \(not UTF-8 text\); pass another$",
        ),
        "list.json": ("[1, 2]", r"result '.*list.json' holds a list, not a JSON object; pass another$"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, bytes):
            (tmp_path / name).write_bytes(content)
        elif content is not None:
            (tmp_path / name).write_text(content)
        with pytest.raises(UserError, match=message):
            read_json_object(tmp_path / name, "result", "pass another", missing_fix="write it first")
    with pytest.raises(UserError, match=r"result '.*' does not exist; pass another$"):
        read_json_object(tmp_path, "result", "pass another")  # a folder is no file; without missing_fix: fix


def test_written_files_get_the_mode_a_new_file_gets(tmp_path):
    """Once every safetensors file (weights, exported bundles, token shards) was 0600: safetensors writes it so,
    and the rename kept it; no other account could load a shared bundle."""
    import os

    import torch

    from dalle_mini_impl.pipeline.bundle import save_state_dict

    umask = os.umask(0o022)
    os.umask(umask)
    save_state_dict({"w": torch.zeros(2)}, tmp_path / "w.safetensors")
    assert (tmp_path / "w.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask


def test_a_path_nothing_can_be_written_to_is_refused_before_any_work(tmp_path):
    """An --out on a read-only disk or in a folder without permission was a traceback, a run's tokenizer stage
    after it had trained, an evaluation's after all its sampling. /proc/self takes no new file, even from root."""
    from dalle_mini_impl.config import check_run_folder
    from dalle_mini_impl.files import check_out_file, unwritable

    assert unwritable("/proc/self/run") == Path("/proc/self") and unwritable(tmp_path / "a" / "b") is None
    with pytest.raises(UserError, match="^run folder '/proc/self/run' cannot be written \\('/proc/self' is read-only"):
        check_run_folder("/proc/self/run")
    with pytest.raises(UserError, match="^--grid '/proc/self/g.png' cannot be written \\('/proc/self' is read-only"):
        check_out_file("/proc/self/g.png", "--grid")
    check_out_file(tmp_path / "new" / "result.json")  # a folder still to make is fine


def test_a_file_where_a_run_keeps_a_folder_is_one_sentence(tmp_path):
    """RUN/logs as a file was a NotADirectoryError at a stage's start, RUN/checkpoints one at its first checkpoint
    (the steps before it lost), RUN/tokens one in train.encode."""
    from dalle_mini_impl.config import check_run_folder

    for kept in ("logs", "checkpoints", "tokens"):
        run = tmp_path / kept
        run.mkdir()
        (run / kept).write_text("x")
        with pytest.raises(UserError, match=f"^'{run / kept}' is a file where the run keeps a folder; move it away"):
            check_run_folder(str(run))



def test_without_file_locks_the_block_runs_unlocked_with_one_warning(tmp_path, monkeypatch):
    """Windows has no fcntl: every training stage once stopped there with a ModuleNotFoundError traceback."""
    import sys

    from dalle_mini_impl import files

    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    files._warn_once_unlocked.cache_clear()
    with pytest.warns(UserWarning, match="no file locks \\(fcntl\\): a second trainer .* is not refused"):
        with files.locked(tmp_path / ".dalle.lock", wait=False, note="1234"):
            with files.locked(tmp_path / ".dalle.lock", wait=False, note="5678"):  # not refused: no lock
                pass
    assert (tmp_path / ".dalle.lock").read_text() == "5678"
    files._warn_once_unlocked.cache_clear()
