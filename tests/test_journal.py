"""The resume journal: a record is taken only under its own name and key, whole, with its files unchanged."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from duplus.journal import ABSENT, OTHER_KEY, Journal, journal_key


def _finished(journal: Journal, name: str = "case1", key: str = "k1") -> None:
    """A piece of work as its callers do it: its files first, then the record that vouches for them."""
    (journal.folder / name).mkdir(parents=True)
    (journal.folder / name / "image.npy").write_bytes(b"image bytes")
    (journal.folder / name / "meta.json").write_text("{}")
    (journal.folder / f"{name}.npz").write_bytes(b"example bytes")
    journal.save(name, key, {"row": {"case": name}, "dice": float("nan")}, files=[name, f"{name}.npz"])


def test_key_is_the_sha256_of_the_sorted_json_of_the_identity():
    identity = {"b": [1, 2.5], "a": {"y": None, "x": "s"}, "path": Path("/x")}
    expected = hashlib.sha256(b'{"a": {"x": "s", "y": null}, "b": [1, 2.5], "path": "/x"}').hexdigest()
    assert journal_key(identity) == expected
    assert journal_key({"a": 1}) != journal_key({"a": 2})


def test_a_finished_record_is_taken_under_its_key_only(tmp_path):
    journal = Journal(tmp_path / "j")
    assert journal.lookup("case1", "k1").reason == ABSENT
    _finished(journal)
    data = journal.load("case1", "k1")
    assert data is not None and data["row"] == {"case": "case1"} and data["dice"] != data["dice"]  # NaN kept
    found = journal.lookup("case1", "k2")
    assert found.data is None and found.reason == OTHER_KEY
    assert journal.load("case2", "k1") is None


def test_a_changed_missing_or_added_file_voids_the_record(tmp_path):
    journal = Journal(tmp_path / "j")
    _finished(journal)
    (journal.folder / "case1.npz").write_bytes(b"example of a later, killed attempt")
    assert "case1.npz has changed" in journal.lookup("case1", "k1").reason
    (journal.folder / "case1.npz").write_bytes(b"example bytes")
    assert journal.load("case1", "k1") is not None  # the same bytes again: the record holds

    (journal.folder / "case1" / "image.npy").write_bytes(b"image byte")  # truncated
    assert journal.load("case1", "k1") is None
    (journal.folder / "case1" / "image.npy").unlink()
    assert "other files" in journal.lookup("case1", "k1").reason
    (journal.folder / "case1" / "image.npy").write_bytes(b"image bytes")
    (journal.folder / "case1" / ".image.npy.x1.tmp.npy").write_bytes(b"a killed write's leftover")
    assert "other files" in journal.lookup("case1", "k1").reason
    (journal.folder / "case1" / ".image.npy.x1.tmp.npy").unlink()
    assert journal.load("case1", "k1") is not None
    (journal.folder / "case1.npz").unlink()
    assert "case1.npz is missing" in journal.lookup("case1", "k1").reason


@pytest.mark.parametrize("damage", ["truncated", "empty", "not an object", "old format", "renamed", "outside"])
def test_a_half_written_or_foreign_record_is_never_taken(tmp_path, damage):
    journal = Journal(tmp_path / "j")
    _finished(journal)
    path = journal.record_path("case1")
    text = path.read_text(encoding="utf-8")
    record = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2], encoding="utf-8")
    elif damage == "empty":
        path.write_text("", encoding="utf-8")
    elif damage == "not an object":
        path.write_text("[]", encoding="utf-8")
    elif damage == "old format":  # what the stages wrote before this journal: a key and the data at the top
        path.write_text(json.dumps({"key": "k1", **record["data"]}), encoding="utf-8")
    elif damage == "renamed":  # another entry's record copied over: it names its own entry
        _finished(journal, "case2")
        path.write_text(journal.record_path("case2").read_text(encoding="utf-8"), encoding="utf-8")
    else:
        path.write_text(json.dumps({**record, "files": {"../elsewhere": "0" * 64}}), encoding="utf-8")
    found = journal.lookup("case1", "k1")
    assert found.data is None and found.reason not in ("", ABSENT, OTHER_KEY)


def test_discard_clear_and_names(tmp_path):
    journal = Journal(tmp_path / "j")
    _finished(journal)
    journal.discard("case1")
    assert journal.lookup("case1", "k1").reason == ABSENT
    assert (journal.folder / "case1" / "image.npy").is_file()  # what the work wrote is the caller's
    journal.discard("case1")  # twice: no error
    journal.clear()
    assert not journal.folder.exists()
    journal.clear()
    for name in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="not a plain file name"):
            journal.record_path(name)
    with pytest.raises(ValueError):
        journal.save("case1", "k1", {}, files=[tmp_path / "outside.npy"])


def test_a_workspace_is_kept_under_its_key_and_emptied_under_another(tmp_path):
    journal = Journal(tmp_path / "j")
    folder, emptied = journal.workspace("lora", "k1")
    assert folder == journal.folder / "lora" and folder.is_dir() and not emptied
    (folder / "step_00000002.json").write_text("{}")
    assert journal.workspace("lora", "k1") == (folder, False)
    assert (folder / "step_00000002.json").is_file()
    assert journal.workspace("lora", "k2") == (folder, True)
    assert not (folder / "step_00000002.json").exists()
    (folder / "step_00000003.json").write_text("{}")
    (folder / "key.json").write_text("{trunc")  # its key record damaged: the folder is not trusted
    assert journal.workspace("lora", "k2") == (folder, True)
    assert sorted(p.name for p in folder.iterdir()) == ["key.json"]


def test_files_given_as_bytes_are_written_first_and_read_back_as_the_bytes_that_verified(tmp_path):
    """How training checkpoints use the journal: the tensors are written from the bytes in memory and
    hashed from them, and a lookup hands back the very bytes it hashed."""
    journal = Journal(tmp_path / "j")
    journal.save("step_00000003", "k1", {"step": 3}, write={"step_00000003.safetensors": b"tensor bytes"})
    assert (journal.folder / "step_00000003.safetensors").read_bytes() == b"tensor bytes"
    record = json.loads(journal.record_path("step_00000003").read_text(encoding="utf-8"))
    assert record["files"] == {"step_00000003.safetensors": hashlib.sha256(b"tensor bytes").hexdigest()}
    found = journal.lookup("step_00000003", "k1", read=["step_00000003.safetensors"])
    assert found.data == {"step": 3} and found.contents == {"step_00000003.safetensors": b"tensor bytes"}
    assert journal.lookup("step_00000003", "k1").contents == {}  # nothing asked for, nothing kept
    assert "does not list other.bin" in journal.lookup("step_00000003", "k1", read=["other.bin"]).reason

    (journal.folder / "step_00000003.safetensors").write_bytes(b"tensor bytez")  # same size, other bytes
    found = journal.lookup("step_00000003", "k1", read=["step_00000003.safetensors"])
    assert found.data is None and found.contents == {} and "has changed" in found.reason
    with pytest.raises(ValueError, match="outside the journal"):
        journal.save("step_00000004", "k1", {}, write={"../escape.bin": b"x"})
    assert not (tmp_path / "escape.bin").exists() and not journal.record_path("step_00000004").exists()
