"""The storage layer on a local folder and on a real S3-compatible server (moto, loopback)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from deliberate_ray import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "run")
    return request.getfixturevalue("s3_bucket") + "/run"


def test_files_tables_and_folders_round_trip(root):
    assert not storage.exists(storage.join(root, "a.json"))
    storage.write_json(storage.join(root, "a.json"), {"x": 1})
    storage.write_table(storage.join(root, "t", "part-0.parquet"), pa.table({"a": [1, 2]}))
    storage.write_table(storage.join(root, "t", "part-1.parquet"), pa.table({"a": [3]}))
    storage.append_text(storage.join(root, "log.jsonl"), "1\n")
    storage.append_text(storage.join(root, "log.jsonl"), "2\n")
    assert storage.read_json(storage.join(root, "a.json")) == {"x": 1}
    assert storage.read_text(storage.join(root, "log.jsonl")) == "1\n2\n"
    parts = storage.glob(storage.join(root, "t"), "part-*.parquet")
    assert [storage.name(p) for p in parts] == ["part-0.parquet", "part-1.parquet"]
    assert sum(storage.read_table(p).num_rows for p in parts) == 3
    assert storage.listdir(root) == ["a.json", "log.jsonl"]
    assert storage.create_exclusive(storage.join(root, ".lock"), b"me")
    assert not storage.create_exclusive(storage.join(root, ".lock"), b"you")
    assert storage.read_text(storage.join(root, ".lock")) == "me"
    storage.remove(storage.join(root, "t"))
    assert storage.glob(storage.join(root, "t"), "*") == []
    if root.startswith("s3://"):
        assert storage.join(root, "x") == root + "/x"  # never a local folder named `s3:`


def test_model_folders_upload_and_local_copy(tmp_path, s3_bucket):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "w.bin").write_bytes(b"\0" * 10)
    uri = s3_bucket + "/export"
    storage.upload_dir(src, uri)
    local = storage.local_copy(uri, cache=tmp_path / "cache")
    assert (tmp_path / "cache") in __import__("pathlib").Path(local).parents
    assert open(f"{local}/sub/w.bin", "rb").read() == b"\0" * 10
    assert storage.local_copy(uri, cache=tmp_path / "cache") == local  # reused
    (src / "config.json").write_text('{"changed": 1}')
    storage.upload_dir(src, uri)
    again = storage.local_copy(uri, cache=tmp_path / "cache")
    assert again != local and open(f"{again}/config.json").read() == '{"changed": 1}'


def test_a_missing_filesystem_package_is_a_clear_error():
    from deliberate_ray.config import ConfigError

    with pytest.raises(ConfigError, match="install"):
        storage.filesystem("nosuchscheme://bucket/x")
