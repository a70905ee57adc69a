"""The cache-hit check: a data file's content hash is remembered with its stat and reused while the stat is
unchanged (datacache.file_fingerprint), and any change to the file makes it read again."""
from __future__ import annotations

import json
import os
import time

import pytest

from minimind_scale.data import cache as datacache
from minimind_scale.data.prepare import prepare_dataset
from minimind_scale.models.build import load_tokenizer
from minimind_scale.training.registry import discover, get_stage

RECORD = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


@pytest.fixture
def reads(monkeypatch):
    """The files whose bytes were hashed, in order; the hash remembered only for files settled for 0.2 s."""
    seen = []
    real = datacache._hash_file

    def spy(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(datacache, "_hash_file", spy)
    monkeypatch.setattr(datacache, "RACY_SECONDS", 0.2)
    return seen


def _settled_file(tmp_path, content: bytes = b"0123456789\n"):
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    time.sleep(0.3)  # older than RACY_SECONDS, so its hash may be remembered
    return path


def test_a_settled_file_is_read_once(tmp_path, reads):
    path, memo = _settled_file(tmp_path), tmp_path / "memo"
    first = datacache.file_fingerprint(path, memo)
    assert first == datacache.file_fingerprint(path) and reads == ["d.jsonl", "d.jsonl"]
    assert datacache.file_fingerprint(path, memo) == first
    assert reads == ["d.jsonl", "d.jsonl"]  # the second look did not read the file


def _same_size_new_content(path):
    path.write_bytes(b"9876543210\n")


def _same_size_content_and_mtime_restored(path):
    st = os.stat(path)
    path.write_bytes(b"9876543210\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the ctime still moves


def _appended(path):
    with open(path, "ab") as f:
        f.write(b"more\n")


def _touched(path):
    os.utime(path, (time.time() + 5, time.time() + 5))


def _replaced(path):
    other = path.with_name("other")
    other.write_bytes(b"9876543210\n")
    os.replace(other, path)


@pytest.mark.parametrize("change", [_same_size_new_content, _same_size_content_and_mtime_restored, _appended,
                                    _touched, _replaced])
def test_any_change_to_the_file_misses(tmp_path, reads, change):
    path, memo = _settled_file(tmp_path), tmp_path / "memo"
    datacache.file_fingerprint(path, memo)
    time.sleep(0.05)  # past the file system's clock tick, as a real edit after hashing would be
    change(path)
    reads.clear()
    assert datacache.file_fingerprint(path, memo) == datacache.file_fingerprint(path)
    assert reads == ["d.jsonl", "d.jsonl"]  # read again, not taken from the memo


def test_a_file_changed_just_before_hashing_is_not_remembered(tmp_path, reads, monkeypatch):
    monkeypatch.setattr(datacache, "RACY_SECONDS", 2.0)
    path, memo = tmp_path / "d.jsonl", tmp_path / "memo"
    path.write_bytes(b"0123456789\n")
    datacache.file_fingerprint(path, memo)
    datacache.file_fingerprint(path, memo)
    assert reads == ["d.jsonl", "d.jsonl"] and not memo.exists()


def test_a_memo_for_another_file_or_version_is_not_used(tmp_path, reads):
    path, memo = _settled_file(tmp_path), tmp_path / "memo"
    datacache.file_fingerprint(path, memo)
    (entry,) = memo.iterdir()
    saved = json.loads(entry.read_text())
    for bad in ({**saved, "path": "/elsewhere"}, {**saved, "version": -1}, {**saved, "hash": 3, "stat": None}):
        entry.write_text(json.dumps(bad))
        reads.clear()
        assert datacache.file_fingerprint(path, memo) == saved["hash"] and reads == ["d.jsonl"]
    entry.write_text("{not json")
    assert datacache.file_fingerprint(path, memo) == saved["hash"]


def test_an_unwritable_memo_directory_only_loses_the_shortcut(tmp_path, reads):
    path = _settled_file(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert datacache.file_fingerprint(path, blocker / "memo") == datacache.file_fingerprint(path)


def test_a_cache_hit_reads_no_data_file_and_an_edit_misses(tmp_path, reads):
    discover()
    spec = get_stage("full_sft")
    path = _settled_file(tmp_path, (json.dumps(RECORD) + "\n").encode())
    cfg = spec.config(data_path=[str(path)], num_proc=1, cache_dir=str(tmp_path / "cache"), packing=False)
    tok = load_tokenizer(None)
    _, first, _ = prepare_dataset(spec, cfg, tok, log=lambda *_: None)
    reads.clear()
    _, again, _ = prepare_dataset(spec, cfg, tok, log=lambda *_: None)
    assert again == first and reads == []
    time.sleep(0.05)
    path.write_text(json.dumps(RECORD).replace("hello", "hellp") + "\n")  # same size, new content
    ds, edited, _ = prepare_dataset(spec, cfg, tok, log=lambda *_: None)
    assert edited != first and reads == ["d.jsonl"] and "hellp" in tok.decode(ds[0]["input_ids"])
