"""Files survive a crash and a full disk: appends repair a torn tail, a failed write is one StorageError line and
leaves every file readable. The full disk is real: a child process runs under RLIMIT_FSIZE, so the kernel refuses
the write part-way (EFBIG), as a full disk does (ENOSPC)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from fedse_secure.io_utils import (
    CorruptFileError,
    StorageError,
    append_jsonl,
    atomic_write_text,
    read_jsonl,
    repair_torn_tail,
)


def test_append_after_a_torn_line_keeps_the_file_readable(tmp_path):
    path = tmp_path / "buffer.jsonl"
    append_jsonl(path, [{"a": 1}, {"a": 2}])
    with open(path, "ab") as fh:
        fh.write(b'{"a": 3, "half')  # a crash in the middle of an append
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    append_jsonl(path, [{"a": 4}])
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}, {"a": 4}], "the torn line is cut off, never glued to the next"
    assert path.read_bytes().endswith(b'{"a": 4}\n')


def test_repair_of_a_file_that_is_only_a_torn_line(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"never finished')
    assert repair_torn_tail(path) == len(b'{"never finished')
    assert path.read_bytes() == b""
    assert repair_torn_tail(path) == 0


def test_a_damaged_complete_line_is_one_clear_error(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_bytes(b'{"ok": 1}\n{"ok": \xff\n')
    with pytest.raises(CorruptFileError, match=r"m.jsonl line 2 is not valid JSON"):
        read_jsonl(path)
    path.write_bytes(b"[" * 100_000 + b"]" * 100_000 + b"\n")
    with pytest.raises(CorruptFileError, match="nested too deeply"):
        read_jsonl(path)
    path.write_bytes(b"[1, 2]\n")
    with pytest.raises(CorruptFileError, match="not a JSON object"):
        read_jsonl(path)


_CHILD = textwrap.dedent("""
    import json, resource, sys
    from fedse_secure.io_utils import StorageError, append_jsonl, atomic_write_text
    path, limit = sys.argv[1], int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        for i in range(100_000):
            append_jsonl(path + ".jsonl", [{"i": i, "pad": "x" * 50}])
    except StorageError as err:
        print(json.dumps({"appended": i, "error": str(err), "errno": err.errno}))
    try:
        atomic_write_text(path + ".json", "y" * (2 * limit))
    except StorageError as err:
        print(json.dumps({"atomic_error": str(err)}))
""")


def test_full_disk_is_one_line_and_every_file_stays_readable(tmp_path):
    base = tmp_path / "state"
    atomic_write_text(str(base) + ".json", "the old summary\n")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(base), "4000"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    first, second = (json.loads(line) for line in proc.stdout.splitlines())
    assert "the disk is full" in first["error"] and "\n" not in first["error"]
    assert "the disk is full" in second["atomic_error"]
    rows = read_jsonl(str(base) + ".jsonl")
    assert [r["i"] for r in rows] == list(range(first["appended"])), "every acknowledged line is there, no torn one"
    assert (tmp_path / "state.jsonl").read_bytes().endswith(b"\n"), "the failed append was cut back"
    assert (tmp_path / "state.json").read_text() == "the old summary\n", "a failed atomic write keeps the old file"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temporary file is left behind"
    append_jsonl(str(base) + ".jsonl", [{"i": "after"}])  # space is back: appending continues where it was
    assert read_jsonl(str(base) + ".jsonl")[-1] == {"i": "after"}


def test_storage_error_is_an_oserror_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StorageError) as info:
        atomic_write_text(blocker / "under" / "summary.json", "{}")
    assert isinstance(info.value, OSError)
    assert "is a file, not a folder" in str(info.value) and "\n" not in str(info.value)
