"""diffugts.storage.location: the same calls on a local folder and on an s3:// prefix."""

from __future__ import annotations

import logging
import uuid

import pytest

from diffugts.errors import InputError
from diffugts.storage.location import is_s3, join, list_children, publish, read_bytes, read_json, write_json


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    env = request.getfixturevalue("s3_env")
    return f"s3://{env.bucket}/location-{uuid.uuid4().hex[:10]}"


def test_join():
    assert join("s3://bkt/a/", "x", "y.json") == "s3://bkt/a/x/y.json"
    assert join("/data/a", "x", "y.json") == "/data/a/x/y.json"
    assert is_s3("s3://bkt/k") and not is_s3("/data/s3://x")


def test_json_round_trip_absent_and_corrupt(root, caplog):
    uri = join(root, "_runs", "k.json")
    assert read_bytes(uri) is None and read_json(uri) is None
    write_json(uri, {"key": "k", "n": [1, 2]})
    assert read_bytes(uri) == b'{\n  "key": "k",\n  "n": [\n    1,\n    2\n  ]\n}\n'  # same bytes both places
    assert read_json(uri) == {"key": "k", "n": [1, 2]}
    write_json(uri, {"key": "k2"})
    assert read_json(uri) == {"key": "k2"}
    if is_s3(root):
        from diffugts.storage import ObjectStore

        ObjectStore().put_bytes(uri, b"\xff not json")
    else:
        with open(uri, "wb") as f:
            f.write(b"\xff not json")
    with caplog.at_level(logging.WARNING, logger="diffugts.storage"):
        assert read_json(uri) is None
    assert "not a JSON document; taken as absent" in caplog.text
    write_json(uri, {"a": 1})
    assert read_json(uri) == {"a": 1}


def test_publish_and_list_children(root, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "done.json").write_text("{}")
    (src / "sub" / "a.txt").write_text("a")
    where = publish(src, join(root, "studies", "s1"), marker="done.json", meta={"run": "r"})
    assert where == join(root, "studies", "s1")
    assert read_bytes(join(where, "sub", "a.txt")) == b"a" and read_bytes(join(where, "done.json")) == b"{}"
    if is_s3(root):
        manifest = read_json(join(where, "_manifest.json"))
        assert manifest["meta"] == {"run": "r"} and len(manifest["files"]) == 2
    publish(src, join(root, "studies", "_s2"), marker="done.json")
    write_json(join(root, "studies", "b.zip"), {})
    children = list_children(join(root, "studies"))
    assert [(c.name, c.is_dir) for c in children] == [("_s2", True), ("b.zip", False), ("s1", True)]
    assert [c.uri for c in children] == [join(root, "studies", n) for n in ("_s2", "b.zip", "s1")]
    assert list_children(join(root, "studies") + "/") == children
    if is_s3(root):
        assert list_children(join(root, "nothing")) == []
    else:
        with pytest.raises(InputError, match="no such folder"):
            list_children(join(root, "nothing"))
