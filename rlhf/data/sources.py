"""Where rows come from: local files and folders, HF datasets, s3:// and embedded assets.

Every loader returns plain ``list[dict]`` rows. Each row carries one extra key, ``__where__``
(``"data/train.jsonl:17"`` for line-based files, ``"data/train.parquet row 16"`` for tabular
ones, where ``row N`` is the 0-based index ``dataset[N]``), so that a validation error raised
much later, while tokenising, can still say which file and which row to fix.

Source forms (``--dataset`` takes a comma-separated list of them):

* a local ``.json`` (a list of objects, or JSON lines), ``.jsonl``, ``.parquet``, ``.arrow``
  or ``.csv`` file;
* a local folder written by ``datasets.save_to_disk`` (a DatasetDict picks ``split``);
* a local folder of such data files (when the file names carry split names, as in
  ``train.jsonl`` / ``test-00000.parquet``, only the files of ``split`` are read);
* ``s3://bucket/key`` (an object or a prefix; downloaded once into a cache folder);
* ``embedded:REL`` (a file or folder shipped in ``rlhf/assets``);
* anything else is an HF hub dataset name, loaded with ``datasets.load_dataset``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
import re
from pathlib import Path
from typing import Any, Callable, Optional

import rlhf
from rlhf.errors import UserError, describe_value

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(rlhf.__file__).parent / "assets"
DATA_EXTENSIONS = (".json", ".jsonl", ".parquet", ".arrow", ".csv")
WHERE_KEY = "__where__"
# File-name tokens that mark a data file as belonging to one split (HF hub layout conventions).
_SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
# The hub's sharded layout names the split in full, whatever it is: data/train_prefs-00000-of-00001.parquet.
_SHARD_NAME = re.compile(r"^(?P<split>[^.-]+)-\d{5}-of-\d{5}$")


# ----------------------------------------------------------------------------------------------
# URIs


def resolve_uri(uri: str, cache_dir: Optional[str] = None) -> str:
    """Turn ``embedded:REL`` and ``s3://...`` into local paths; return anything else unchanged.

    ``cache_dir`` is the root for s3 downloads (default ``~/.cache/rlhf/s3``); an object lands
    under ``<root>/<bucket>/<key>``, so two URIs never share a folder. Used for model and data.
    """
    if uri.startswith("embedded:"):
        rel = uri[len("embedded:") :].strip("/")
        path = ASSETS_DIR / rel
        if not rel or not path.exists():
            available = sorted(p.name for p in ASSETS_DIR.iterdir()) if ASSETS_DIR.is_dir() else []
            raise UserError(f"{uri}: no such embedded asset (rlhf/assets holds: {', '.join(available) or 'nothing'})")
        return str(path)
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://") :].partition("/")
        key = key.strip("/")  # "" for a whole bucket
        if not bucket or any(part in (".", "..") for part in key.split("/")):
            # ".." would place the download outside the cache folder.
            raise UserError(f"{uri}: an s3 URI must look like s3://bucket/key (no '.' or '..' parts)")
        root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "rlhf" / "s3"
        from rlhf.io.s3 import download  # lazy: boto3 is only needed by users of s3

        return download(uri, str(root / bucket / key))
    return uri


def _looks_local(source: str) -> bool:
    """True when ``source`` is clearly meant as a local path, so a miss is a typo, not a hub name."""
    return source.startswith(("/", "./", "../", "~")) or source.lower().endswith(DATA_EXTENSIONS)


# ----------------------------------------------------------------------------------------------
# One source


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Load every row of one source as dicts, each tagged with ``__where__``.

    ``split`` picks the split of a DatasetDict folder, of a split-named folder of files and of
    a hub dataset; a single file has no splits and ignores it.
    """
    source = source.strip()
    path = Path(os.path.expanduser(resolve_uri(source)))
    if path.is_file():
        rows = _load_file(path, source)
    elif path.is_dir():
        rows = _load_folder(path, source, split)
    elif _looks_local(source):
        raise UserError(f"{source}: no such file or directory")
    else:
        rows = _load_hub(source, split)
    if not rows:
        raise UserError(f"{source}: dataset is empty")
    return rows


def _load_file(path: Path, label: str) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".json", ".jsonl"):
        return _load_json(path, label)
    if suffix == ".csv":
        return _load_csv(path, label)
    if suffix == ".parquet":
        return _tag(_read_parquet(path, label), label)
    if suffix == ".arrow":
        return _tag(_read_arrow(path, label), label)
    raise UserError(f"{label}: unsupported file type {suffix or '(none)'!r} (use {', '.join(DATA_EXTENSIONS)})")


def _tag(records: list[dict], label: str) -> list[dict]:
    """Attach row-index locations to records that have no line numbers (tabular formats)."""
    for i, record in enumerate(records):
        record[WHERE_KEY] = f"{label} row {i}"
    return records


def _read_text(path: Path, label: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # -sig: tolerate a byte-order mark
    except UnicodeDecodeError as err:
        raise UserError(f"{label}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def _load_json(path: Path, label: str) -> list[dict]:
    """A JSON list of objects, or JSON lines (one object per line, blank lines skipped)."""
    text = _read_text(path, label)
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{label}:{err.lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
        rows = []
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                raise UserError(f"{label} row {i}: expected a JSON object, got {describe_value(item)}")
            rows.append({**item, WHERE_KEY: f"{label} row {i}"})
        return rows
    # JSON lines, parsed one line at a time so an error names its line.
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            if lineno == 1 and _is_single_object(text):
                raise UserError(f"{label}: holds one JSON object; expected a list of objects or JSON lines") from None
            raise UserError(f"{label}:{lineno}: malformed JSON ({err.msg}, column {err.colno})") from None
        if not isinstance(item, dict):
            raise UserError(f"{label}:{lineno}: expected a JSON object, got {describe_value(item)}")
        item[WHERE_KEY] = f"{label}:{lineno}"
        rows.append(item)
    return rows


def _is_single_object(text: str) -> bool:
    """A pretty-printed single object fails line-by-line parsing; say so instead of 'line 1'."""
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def _load_csv(path: Path, label: str) -> list[dict]:
    """CSV with a header row; a row's location is the line its record ends on (csv skips blank
    lines, so counting records would drift; the reader's line counter does not)."""
    rows = []
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        try:
            for record in reader:
                record[WHERE_KEY] = f"{label}:{reader.line_num}"
                rows.append(record)
        except (csv.Error, UnicodeDecodeError) as err:
            raise UserError(f"{label}:{reader.line_num}: malformed CSV ({err})") from None
    return rows


def _read_parquet(path: Path, label: str) -> list[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{label}: cannot read Parquet file ({err})") from None


def _read_arrow(path: Path, label: str) -> list[dict]:
    """Arrow IPC: the stream format (what ``datasets`` writes) or the file format (Feather v2)."""
    import pyarrow as pa

    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{label}: cannot read Arrow file ({err})") from None
    return table.to_pylist()


def _load_folder(path: Path, label: str, split: str) -> list[dict]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_saved_dataset(path, label, split)
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not files:
        raise UserError(f"{label}: folder holds no data files ({', '.join(DATA_EXTENSIONS)})")
    splits = {f: _split_of(f.relative_to(path)) for f in files}
    if any(splits.values()):
        # Split-named files (train.jsonl, test-0000.parquet): mixing them would leak eval rows.
        chosen = [f for f in files if splits[f] == split]
        if not chosen:
            # A short name for a longer split ('train' for the only 'train_data'), if unambiguous.
            longer = {s for s in splits.values() if s and s.startswith(split + "_")}
            if len(longer) == 1:
                chosen = [f for f in files if splits[f] in longer]
        if not chosen:
            available = sorted({s for s in splits.values() if s})
            raise UserError(f"{label}: no files for split {split!r} (available splits: {', '.join(available)})")
        ignored = [f.name for f in files if splits[f] is None]
        if ignored:
            logger.warning("%s: ignoring files without a split name: %s", label, ", ".join(ignored))
        files = chosen
    rows: list[dict] = []
    for f in files:
        rows.extend(_load_file(f, f"{label.rstrip('/')}/{f.relative_to(path).as_posix()}"))
    return rows


def _split_of(relpath: Path) -> Optional[str]:
    """The split a data file belongs to by its name: ``train-00001.parquet`` -> ``train``,
    ``data/train_prefs-00000-of-00001.parquet`` and ``train_prefs.jsonl`` -> ``train_prefs``.

    A name is a split when it is a known split name, a known name with an ``_suffix``
    (UltraFeedback's ``train_prefs`` / ``test_gen``), or anything in the hub's sharded layout
    ``NAME-00000-of-00001``; the name ends at the first ``-`` or ``.``, never at ``_`` (but a
    numbered shard ``train_0001`` is ``train``).
    """
    parts = list(relpath.parts[:-1]) + [relpath.name.split(".")[0]]
    for part in parts:
        shard = _SHARD_NAME.match(part)
        if shard:
            return shard["split"].lower()
        token = re.sub(r"_\d+$", "", re.split(r"[-.]", part)[0].lower())  # train_0001 is a shard of train
        if token.split("_")[0] in _SPLIT_NAMES:
            return token
    return None


def _load_saved_dataset(path: Path, label: str, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except (OSError, ValueError, FileNotFoundError) as err:
        raise UserError(f"{label}: cannot load dataset folder ({_one_line(err)})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserError(f"{label}: no split {split!r} (available splits: {', '.join(loaded.keys())})")
        loaded = loaded[split]
    return _tag(loaded.to_list(), label)


def _load_hub(name: str, split: str) -> list[dict]:
    import datasets

    try:
        loaded = datasets.load_dataset(name, split=split)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean "cannot load"
        raise UserError(f"{name}: is not a local file/folder and could not be loaded from the hub: {_one_line(err)}") from None
    return _tag(loaded.to_list(), name)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:297] + "..."


# ----------------------------------------------------------------------------------------------
# Several sources


def load_mixture(dataset: str, probs: Optional[str], split: str, max_samples: int, seed: int) -> list[dict]:
    """Load the comma-separated sources of ``dataset`` and mix them by weight.

    The mixture has ``min(max_samples, total rows)`` rows; source ``i`` contributes a share
    proportional to its weight (equal weights when ``probs`` is None), rounded so the shares
    add up exactly. A share smaller than the source takes a random subset; a larger one
    repeats the source (every row the same number of times, plus a random remainder).
    Rows keep their source's order and sources follow ``dataset``'s order: the trainer's
    sampler shuffles, and keeping the order makes the output easy to inspect. The result is a
    pure function of the arguments (``random.Random(seed)``).
    """
    sources = [s.strip() for s in dataset.split(",") if s.strip()]
    if not sources:
        raise UserError("--dataset is empty: give at least one source")
    weights = _parse_probs(probs, len(sources))
    loaded = [load_rows(s, split) if w > 0 else [] for s, w in zip(sources, weights)]
    total = min(max_samples, sum(len(rows) for rows, w in zip(loaded, weights) if w > 0))
    counts = _largest_remainder([w / sum(weights) for w in weights], total)
    rng = random.Random(seed)
    mixed: list[dict] = []
    for rows, count in zip(loaded, counts):
        mixed.extend(dict(rows[i]) for i in _draw_indices(len(rows), count, rng))
    return mixed


def _parse_probs(probs: Optional[str], n_sources: int) -> list[float]:
    if probs is None:
        return [1.0] * n_sources
    try:
        weights = [float(p) for p in probs.split(",")]
    except ValueError:
        raise UserError(f"--dataset_probs must be comma-separated numbers, got {probs!r}") from None
    if len(weights) != n_sources:
        raise UserError(f"--dataset_probs has {len(weights)} values for {n_sources} --dataset sources")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise UserError(f"--dataset_probs must be >= 0 with a positive sum, got {probs!r}")
    return weights


def _largest_remainder(shares: list[float], total: int) -> list[int]:
    """Integer counts proportional to ``shares`` that sum exactly to ``total``."""
    exact = [s * total for s in shares]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _draw_indices(n: int, count: int, rng: random.Random) -> list[int]:
    """``count`` indices into ``n`` rows: whole passes, then a sorted random remainder."""
    if n == 0 or count == 0:
        return []
    full_passes, remainder = divmod(count, n)
    return list(range(n)) * full_passes + sorted(rng.sample(range(n), remainder))


def holdout_split(rows: list[dict], ratio: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Split rows into (train, eval) with ``ratio`` of them in eval, the same way for a seed.

    At least one row goes to eval when ``ratio > 0`` and at least one stays in train; both
    parts keep the input order.
    """
    if ratio <= 0 or len(rows) < 2:
        return list(rows), []
    n_eval = min(max(1, int(len(rows) * ratio)), len(rows) - 1)
    eval_idx = set(random.Random(seed).sample(range(len(rows)), n_eval))
    train = [r for i, r in enumerate(rows) if i not in eval_idx]
    held = [r for i, r in enumerate(rows) if i in eval_idx]
    return train, held


def load_train_eval(data_cfg: Any, seed: int, tokenize: Callable[[list[dict]], list]) -> tuple[list, list]:
    """Training and eval examples of a trainer: --dataset (mixed), and --eval_dataset or a
    --eval_holdout_ratio share of the training rows; ``tokenize`` turns rows into examples."""
    rows = load_mixture(data_cfg.dataset, data_cfg.dataset_probs, data_cfg.train_split, data_cfg.max_samples, seed)
    if data_cfg.eval_dataset:
        eval_rows = load_mixture(data_cfg.eval_dataset, None, data_cfg.eval_split, data_cfg.max_samples, seed)
    else:
        rows, eval_rows = holdout_split(rows, data_cfg.eval_holdout_ratio, seed)
    return tokenize(rows), tokenize(eval_rows) if eval_rows else []
