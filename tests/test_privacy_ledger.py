"""Privacy ledger: append-only, hash-chained, sealed head; edits, deletions (incl. the last line) are caught."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedse_secure.privacy import (
    GENESIS_HASH,
    DpEvent,
    LedgerCorruptedError,
    LedgerError,
    PrivacyLedger,
)


def _event(steps: int = 10, q: float = 0.1, sigma: float = 1.0) -> DpEvent:
    return DpEvent("subsampled_gaussian", "record", sigma, q, steps, 1.0, population=40)


def _ledger(tmp_path, n: int = 4) -> PrivacyLedger:
    ledger = PrivacyLedger(tmp_path / "hospital-a.jsonl")
    for r in range(n):
        ledger.append(_event(steps=10 + r), round=r, institution="hospital-a", delta=1e-5)
    return ledger


def _lines(ledger: PrivacyLedger) -> list[str]:
    return ledger.path.read_text().splitlines(keepends=True)


def _write(ledger: PrivacyLedger, lines: list[str]) -> None:
    ledger.path.write_text("".join(lines))


def test_append_and_read_back(tmp_path):
    ledger = _ledger(tmp_path, 3)
    entries = ledger.entries()
    assert [e.seq for e in entries] == [1, 2, 3]
    assert [e.round for e in entries] == [0, 1, 2]
    assert entries[0].prev_hash == GENESIS_HASH
    assert all(b.prev_hash == a.hash for a, b in zip(entries, entries[1:]))
    assert entries[1].event == _event(steps=11)
    report = ledger.verify()
    assert report.ok and report.entries == 3 and report.sealed_entries == 3 and not report.warnings
    assert ledger.head_hash() == entries[-1].hash
    # Every line is a self-describing DP event record, not just an ε.
    record = json.loads(_lines(ledger)[0])
    assert set(record["event"]) >= {"mechanism", "noise_multiplier", "sample_rate", "steps", "clipping_bound"}
    assert {"round", "institution", "time", "prev_hash", "hash"} <= set(record)
    assert ledger.events_by_round() == [(0, [_event(10)]), (1, [_event(11)]), (2, [_event(12)])]


def test_empty_ledger_verifies(tmp_path):
    ledger = PrivacyLedger(tmp_path / "none.jsonl")
    assert ledger.verify().ok and ledger.entries() == []


def test_edited_line_is_named(tmp_path):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    lines[1] = lines[1].replace('"steps":11', '"steps":1')  # understate what round 1 spent
    _write(ledger, lines)
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 2 and "edited" in report.problem
    assert report.entries == 1
    with pytest.raises(LedgerCorruptedError, match="line 2"):
        ledger.entries()


def test_edit_with_recomputed_hash_is_caught_at_the_next_line(tmp_path):
    from fedse_secure.audit.chain import canonical as _canonical, record_hash as _entry_hash

    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    record = json.loads(lines[1])
    record["event"]["noise_multiplier"] = 50.0
    record["hash"] = _entry_hash(record)
    lines[1] = _canonical(record).decode() + "\n"
    _write(ledger, lines)
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 3 and "chain is broken" in report.problem


def test_edit_of_last_line_with_recomputed_hash_is_caught_by_the_head(tmp_path):
    from fedse_secure.audit.chain import canonical as _canonical, record_hash as _entry_hash

    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    record = json.loads(lines[-1])
    record["event"]["steps"] = 1
    record["hash"] = _entry_hash(record)
    lines[-1] = _canonical(record).decode() + "\n"
    _write(ledger, lines)
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 4 and "head record" in report.problem


@pytest.mark.parametrize("deleted", [0, 1, 2])
def test_deleted_middle_line_is_named(tmp_path, deleted):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    del lines[deleted]
    _write(ledger, lines)
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == deleted + 1
    assert "chain is broken" in report.problem


def test_deleted_last_line_is_caught_by_the_sealed_head(tmp_path):
    ledger = _ledger(tmp_path)
    _write(ledger, _lines(ledger)[:-1])
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 4
    assert "entries 4..4 are missing" in report.problem


def test_truncated_to_empty_is_caught(tmp_path):
    ledger = _ledger(tmp_path)
    _write(ledger, [])
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 1 and "missing" in report.problem


def test_deleted_head_record_is_an_error(tmp_path):
    ledger = _ledger(tmp_path)
    ledger.head_path.unlink()
    report = ledger.verify()
    assert not report.ok and "head record" in report.problem and "missing" in report.problem


def test_last_line_and_head_rewritten_together_needs_the_external_head(tmp_path):
    ledger = _ledger(tmp_path)
    recorded_elsewhere = ledger.head_hash()
    # A careful forger drops the last entry and reseals the head: the files alone are consistent again...
    _write(ledger, _lines(ledger)[:-1])
    entries = PrivacyLedger(ledger.path)._read_lines()
    last = json.loads(entries[-1])
    ledger.head_path.write_text(json.dumps({"v": 1, "entries": 3, "head_hash": last["hash"], "updated": last["time"]}))
    assert ledger.verify().ok
    # ...but not against the head hash recorded outside the institution.
    report = ledger.verify(expected_head=recorded_elsewhere)
    assert not report.ok and "externally recorded" in report.problem


def test_torn_or_garbled_lines(tmp_path):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    _write(ledger, lines[:-1] + [lines[-1][:40]])  # torn final write without newline
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 4
    _write(ledger, lines[:2] + ["{not json\n"] + lines[2:])
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 3 and "not valid JSON" in report.problem


def test_reordered_lines_are_caught(tmp_path):
    ledger = _ledger(tmp_path)
    lines = _lines(ledger)
    lines[1], lines[2] = lines[2], lines[1]
    _write(ledger, lines)
    report = ledger.verify()
    assert not report.ok and report.first_bad_line == 2


def test_append_refuses_a_corrupted_ledger_and_leaves_it_untouched(tmp_path):
    ledger = _ledger(tmp_path)
    _write(ledger, _lines(ledger)[:-1])
    before = ledger.path.read_bytes()
    with pytest.raises(LedgerCorruptedError, match="line 4"):
        ledger.append(_event(), round=5, institution="hospital-a", delta=1e-5)
    assert ledger.path.read_bytes() == before


def test_append_checks_institution_and_round_order(tmp_path):
    ledger = _ledger(tmp_path, 2)
    with pytest.raises(LedgerError, match="separate ledger"):
        ledger.append(_event(), round=3, institution="hospital-b", delta=1e-5)
    with pytest.raises(LedgerError, match="before the last recorded round"):
        ledger.append(_event(), round=0, institution="hospital-a", delta=1e-5)
    ledger.append(_event(), round=1, institution="hospital-a", delta=1e-5)  # several events in one round are allowed
    assert ledger.verify().entries == 3


def test_unsealed_tail_after_a_crash_is_a_warning_and_the_next_append_seals_it(tmp_path):
    ledger = _ledger(tmp_path, 3)
    sealed_head = ledger.head_path.read_bytes()
    ledger.append(_event(), round=3, institution="hospital-a", delta=1e-5)
    ledger.head_path.write_bytes(sealed_head)  # as if the process died between the two renames
    report = ledger.verify()
    assert report.ok and report.sealed_entries == 3 and report.entries == 4
    assert "not sealed" in report.warnings[0]
    ledger.append(_event(), round=4, institution="hospital-a", delta=1e-5)
    report = ledger.verify()
    assert report.ok and report.sealed_entries == 5 and not report.warnings


def test_no_temporary_files_are_left_behind(tmp_path):
    _ledger(tmp_path, 3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["hospital-a.jsonl", "hospital-a.jsonl.head", "hospital-a.jsonl.lock"]


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), data=st.data())
def test_any_single_line_deletion_or_byte_flip_is_detected(tmp_path_factory, n, data):
    ledger = _ledger(tmp_path_factory.mktemp("l"), n)
    lines = _lines(ledger)
    i = data.draw(st.integers(0, n - 1), label="line")
    if data.draw(st.booleans(), label="delete"):
        del lines[i]
        report_line = i + 1
    else:
        pos = data.draw(st.integers(0, len(lines[i]) - 2), label="pos")  # keep the newline
        ch = lines[i][pos]
        lines[i] = lines[i][:pos] + ("0" if ch != "0" else "1") + lines[i][pos + 1:]
        report_line = i + 1
    _write(ledger, lines)
    report = ledger.verify()
    assert not report.ok
    assert report.first_bad_line == report_line
