"""rlhf.io.s3 against a real S3-compatible HTTP server (moto) on loopback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rlhf.errors import UserError
from rlhf.io.s3 import download, parse_s3_uri, upload_folder

MODEL_FILES = {
    "config.json": b'{"model_type": "qwen2"}',
    "model.safetensors": os.urandom(300_000),
    "tokenizer/vocab.json": b'{"a": 0}',
    "tokenizer/deep/merges.txt": b"a b\n",
}


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("s3://bucket/a/b.json", ("bucket", "a/b.json")),
        ("s3://my.bucket-1/prefix/", ("my.bucket-1", "prefix/")),
        ("s3://bucket", ("bucket", "")),
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["bucket/key", "s3:/bucket/key", "s3://", "s3:///key", "s3://b/key", "s3://bad bucket/k", "https://x/y"])
def test_bad_uri_is_a_user_error_naming_it(uri):
    with pytest.raises(UserError) as err:
        parse_s3_uri(uri)
    assert uri in str(err.value) and "\n" not in str(err.value)


def test_bad_uri_stops_download_and_upload(tmp_path):
    with pytest.raises(UserError, match="not an S3 URI"):
        download("bucket/model", str(tmp_path))
    with pytest.raises(UserError, match="not an S3 URI"):
        upload_folder(str(tmp_path), "/local/path")


def test_upload_folder_then_download_prefix(s3_env, make_bucket, tmp_path):
    bucket = make_bucket()
    src = write_tree(tmp_path / "export", MODEL_FILES)

    assert upload_folder(str(src), f"s3://{bucket}/runs/7/model") == len(MODEL_FILES)
    keys = sorted(o["Key"] for o in s3_env.list_objects_v2(Bucket=bucket)["Contents"])
    assert keys == sorted(f"runs/7/model/{rel}" for rel in MODEL_FILES)

    for uri in (f"s3://{bucket}/runs/7/model", f"s3://{bucket}/runs/7/model/"):
        dest = tmp_path / f"dl-{uri.endswith('/')}"
        assert download(uri, str(dest)) == str(dest)
        assert read_tree(dest) == MODEL_FILES
        assert not [p for p in dest.rglob(".*")], "temporary download files left behind"


def test_prefix_match_is_by_folder_not_by_string(s3_env, make_bucket, tmp_path):
    # s3://b/model must not pick up s3://b/model-old/...
    bucket = make_bucket()
    s3_env.put_object(Bucket=bucket, Key="model/config.json", Body=b"new")
    s3_env.put_object(Bucket=bucket, Key="model-old/config.json", Body=b"old")
    s3_env.put_object(Bucket=bucket, Key="model/", Body=b"")  # console-style folder marker
    dest = tmp_path / "m"
    download(f"s3://{bucket}/model", str(dest))
    assert read_tree(dest) == {"config.json": b"new"}


def test_upload_to_bucket_root_and_download_whole_bucket(s3_env, make_bucket, tmp_path):
    bucket = make_bucket()
    src = write_tree(tmp_path / "src", {"a.txt": b"a", "d/b.txt": b"b"})
    assert upload_folder(str(src), f"s3://{bucket}") == 2
    dest = tmp_path / "dest"
    assert download(f"s3://{bucket}/", str(dest)) == str(dest)
    assert read_tree(dest) == {"a.txt": b"a", "d/b.txt": b"b"}


def test_download_single_object(s3_env, make_bucket, tmp_path):
    bucket = make_bucket()
    s3_env.put_object(Bucket=bucket, Key="data/train.jsonl", Body=b'{"input": "1+1", "output": "2"}\n')
    path = download(f"s3://{bucket}/data/train.jsonl", str(tmp_path / "cache"))
    assert path == str(tmp_path / "cache" / "train.jsonl")
    assert Path(path).read_bytes() == b'{"input": "1+1", "output": "2"}\n'


def test_cache_skips_files_of_the_same_size(s3_env, make_bucket, tmp_path):
    bucket = make_bucket()
    s3_env.put_object(Bucket=bucket, Key="m/a.bin", Body=b"0123456789")
    s3_env.put_object(Bucket=bucket, Key="m/b.bin", Body=b"abc")
    dest = tmp_path / "m"
    download(f"s3://{bucket}/m", str(dest))

    # Mark the cached copies: same size -> kept as is; a wrong size (a stale or partial file)
    # -> downloaded again.
    (dest / "a.bin").write_bytes(b"XXXXXXXXXX")
    (dest / "b.bin").write_bytes(b"ab")
    download(f"s3://{bucket}/m", str(dest))
    assert (dest / "a.bin").read_bytes() == b"XXXXXXXXXX"
    assert (dest / "b.bin").read_bytes() == b"abc"

    single = download(f"s3://{bucket}/m/a.bin", str(dest))
    assert Path(single).read_bytes() == b"XXXXXXXXXX"


def test_missing_object_or_prefix(s3_env, make_bucket, tmp_path):
    bucket = make_bucket()
    s3_env.put_object(Bucket=bucket, Key="exists/x", Body=b"x")
    uri = f"s3://{bucket}/nothing/here"
    with pytest.raises(UserError) as err:
        download(uri, str(tmp_path / "d"))
    assert str(err.value) == f"{uri}: no such object or prefix"
    assert not (tmp_path / "d").exists()


def test_missing_bucket(s3_env, tmp_path):
    with pytest.raises(UserError, match=r"^s3://no-such-bucket-xyz/m: no such object or prefix"):
        download("s3://no-such-bucket-xyz/m", str(tmp_path))
    with pytest.raises(UserError, match=r"^s3://no-such-bucket-xyz/.*does not exist"):
        upload_folder(str(write_tree(tmp_path / "s", {"f": b"1"})), "s3://no-such-bucket-xyz/out")


def test_upload_folder_needs_a_folder(s3_env, make_bucket, tmp_path):
    with pytest.raises(UserError, match="not a folder"):
        upload_folder(str(tmp_path / "missing"), f"s3://{make_bucket()}/x")


def test_missing_credentials_is_one_line_user_error(s3_env, make_bucket, monkeypatch, tmp_path):
    bucket = make_bucket()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(UserError) as err:
        download(f"s3://{bucket}/m", str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"s3://{bucket}/m: ") and "credentials" in message.lower() and "\n" not in message


def test_unreachable_endpoint_is_one_line_user_error(s3_env, monkeypatch, tmp_path):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # standard AWS knob: fail fast, no retries
    with pytest.raises(UserError) as err:
        download("s3://bucket/m", str(tmp_path))
    message = str(err.value)
    assert message.startswith("s3://bucket/m: ") and f"127.0.0.1:{port}" in message and "\n" not in message
