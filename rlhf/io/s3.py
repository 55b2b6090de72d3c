"""Fetch models and data from S3 (or any S3-compatible store) and upload the final export.

Everything about *where* S3 is and *who* we are comes from the standard AWS configuration
that boto3 already reads: ``AWS_ENDPOINT_URL`` (MinIO, Ceph, a local moto server ...),
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``AWS_PROFILE``,
``AWS_DEFAULT_REGION``, ``AWS_MAX_ATTEMPTS`` and ``~/.aws/config``. We add no variables of our
own, so a setup that works with the ``aws`` CLI works here unchanged.

A URI names either one object (``s3://bucket/data/train.jsonl``) or a "folder", i.e. every
object under a key prefix (``s3://bucket/models/qwen``). Downloads are cached by size and
written atomically, so re-running a job re-uses complete files and never trusts a half file
left by a killed one. Every failure the user can fix (bad URI, missing object, no credentials,
unreachable endpoint, access denied) becomes a one-line ``UserError``.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Optional

from rlhf.errors import UserError

SCHEME = "s3://"

# Bucket names as S3 accepts them (3-63 chars); upper case and '_' are tolerated because old
# us-east-1 buckets and some S3-compatible stores allow them, and the server has the last word.
_BUCKET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,61}[A-Za-z0-9]$")


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``; the key may be empty (whole bucket).

    Raises ``UserError`` naming the URI when it is not of that form.
    """
    if not isinstance(uri, str) or not uri.startswith(SCHEME):
        raise UserError(f"{uri!r}: not an S3 URI (expected s3://bucket/key)")
    bucket, _, key = uri[len(SCHEME) :].partition("/")
    if not bucket:
        raise UserError(f"{uri}: missing bucket name (expected s3://bucket/key)")
    if not _BUCKET_RE.match(bucket):
        raise UserError(f"{uri}: invalid bucket name {bucket!r} (3-63 letters, digits, '.', '-' or '_')")
    if key != key.strip():
        # Leading/trailing blanks are almost always a quoting mistake on the command line.
        raise UserError(f"{uri!r}: key has leading or trailing whitespace")
    return bucket, key


# ----------------------------------------------------------------------------------------------
# Client and error translation


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def _client() -> Any:
    """An S3 client configured purely from the standard AWS environment / config files."""
    import boto3

    try:
        return boto3.session.Session().client("s3")
    except ValueError as err:  # e.g. a malformed AWS_ENDPOINT_URL
        raise UserError(f"cannot create an S3 client: {_one_line(err)} (check AWS_ENDPOINT_URL)") from None
    except Exception as err:  # botocore config errors (unknown profile, bad config file ...)
        if _is_boto_error(err):
            raise UserError(f"cannot create an S3 client: {_one_line(err)}") from None
        raise


def _is_boto_error(err: BaseException) -> bool:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError

    return isinstance(err, (BotoCoreError, ClientError, Boto3Error))


def _error_code(err: BaseException) -> Optional[str]:
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")) or None
    return None


@contextlib.contextmanager
def _user_errors(uri: str, reading: bool = True) -> Iterator[None]:
    """Turn botocore/boto3 failures into ``UserError("<uri>: <botocore message>")``.

    Credential, endpoint, permission and missing-bucket problems are all things the user fixes
    in their environment, so none of them deserves a traceback.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        if not _is_boto_error(err):
            raise
        if reading and _error_code(err) == "NoSuchBucket":
            bucket, _ = parse_s3_uri(uri)
            raise UserError(f"{uri}: no such object or prefix (bucket {bucket!r} does not exist)") from None
        raise UserError(f"{uri}: {_one_line(err)}") from None


# ----------------------------------------------------------------------------------------------
# Download


def _head(client: Any, bucket: str, key: str) -> Optional[dict]:
    """The object's metadata, or None when no object has exactly this key."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key)
    except ClientError as err:
        # HEAD responses have no body, so a missing key shows up only as a bare 404.
        if _error_code(err) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _list_prefix(client: Any, bucket: str, prefix: str) -> list[tuple[str, int]]:
    """(key, size) of every object under ``prefix``, skipping zero-byte "folder" markers."""
    found = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue  # console-created "directory" placeholder, not a file
            found.append((obj["Key"], int(obj["Size"])))
    return found


def _local_path(uri: str, dest_dir: Path, relative_key: str) -> Path:
    """Where an object lands under ``dest_dir``; refuses keys that would escape it ('../')."""
    parts = PurePosixPath(relative_key).parts
    if not parts or any(p in ("", ".", "..") for p in parts) or PurePosixPath(relative_key).is_absolute():
        raise UserError(f"{uri}: object key {relative_key!r} cannot be mapped to a file inside {dest_dir}")
    return dest_dir.joinpath(*parts)


def _fetch(client: Any, uri: str, bucket: str, key: str, size: int, dest: Path) -> bool:
    """Download one object to ``dest`` atomically; returns False when the cache already has it.

    The cache test is the size only: S3 ETags are not content hashes for multipart uploads, and
    a file of the right size written via a temporary name + rename can only be a complete one.
    """
    if dest.is_file() and dest.stat().st_size == size:
        return False
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The pid keeps ranks that share a node (and a dest_dir) from writing the same temp file.
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}")
    try:
        with _user_errors(f"s3://{bucket}/{key}"):
            client.download_file(bucket, key, str(tmp))
        got = tmp.stat().st_size
        if got != size:
            raise UserError(f"s3://{bucket}/{key}: downloaded {got} bytes, expected {size} (object changed during download?)")
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True


def download(uri: str, dest_dir: str) -> str:
    """Download an object or a whole prefix from S3 into ``dest_dir``.

    * ``uri`` names one object: it is saved as ``dest_dir/<basename of the key>`` and that file
      path is returned.
    * ``uri`` names a prefix (a trailing ``/`` is optional): every object under it is saved at
      its path relative to the prefix, and ``dest_dir`` is returned.

    Files already present with the object's size are not downloaded again. An exact object key
    wins over a prefix of the same name.
    """
    bucket, key = parse_s3_uri(uri)
    dest = Path(dest_dir)
    client = _client()
    with _user_errors(uri):
        if key and not key.endswith("/"):
            head = _head(client, bucket, key)
            if head is not None:
                target = dest / PurePosixPath(key).name
                _fetch(client, uri, bucket, key, int(head["ContentLength"]), target)
                return str(target)
        prefix = key if (not key or key.endswith("/")) else key + "/"
        objects = _list_prefix(client, bucket, prefix)
    if not objects:
        raise UserError(f"{uri}: no such object or prefix")
    # Map every key first so a bad key fails the call before anything is written.
    plan = [(k, size, _local_path(uri, dest, k[len(prefix) :])) for k, size in objects]
    dest.mkdir(parents=True, exist_ok=True)
    for k, size, target in plan:
        _fetch(client, uri, bucket, k, size, target)
    return str(dest)


# ----------------------------------------------------------------------------------------------
# Upload


def upload_folder(local_dir: str, uri: str) -> int:
    """Upload every file under ``local_dir`` to ``uri`` (a prefix), keeping relative paths.

    ``upload_folder("out/model", "s3://b/runs/7")`` writes ``s3://b/runs/7/config.json`` and so
    on. Returns the number of files uploaded. Used for ``--s3_save_path`` after the final export.
    """
    bucket, key = parse_s3_uri(uri)
    root = Path(local_dir)
    if not root.is_dir():
        raise UserError(f"{local_dir}: not a folder, nothing to upload to {uri}")
    prefix = key.rstrip("/")
    files = sorted(p for p in root.rglob("*") if p.is_file())
    client = _client()
    for path in files:
        rel = path.relative_to(root).as_posix()
        object_key = f"{prefix}/{rel}" if prefix else rel
        with _user_errors(f"s3://{bucket}/{object_key}", reading=False):
            client.upload_file(str(path), bucket, object_key)
    return len(files)
