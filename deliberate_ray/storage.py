"""Run directories on any filesystem: a local folder or an fsspec/pyarrow URI (s3://, gs://).

Every stage reads and writes its run directory through these functions, so `run_dir:
s3://bucket/runs/x` keeps tuples, documents, checkpoints, exports, markers and eval outputs
in the bucket (a local path behaves as before). Paths are strings; `join` keeps a URI a URI.

Atomicity, which resume relies on: a local file is written to a temp name and renamed; an
object store's PUT is atomic per object (a reader sees the old object, the new one, or
none), so a remote file is written in place. Model folders (exports) are loaded by
transformers and vLLM from local disk: `local_copy` downloads a remote folder once into the
cache, keyed by its URI and the objects' ETags, so a changed export is downloaded again.

Credentials and endpoints come from the environment, as the SDKs read them
(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL for S3 and S3-compatible
stores; GOOGLE_APPLICATION_CREDENTIALS for gs://), never from configs. s3:// needs the
`s3` extra (s3fs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

from deliberate_ray.config import ConfigError

PathLike = str | Path
_EXTRAS = {"s3": "s3fs (pip install 'deliberate-ray[s3]')", "gs": "gcsfs (pip install gcsfs)"}


def is_remote(path: PathLike) -> bool:
    """A URI with a scheme other than file:// (s3://, gs://, memory://, ...)."""
    s = str(path)
    return "://" in s and not s.startswith("file://")


def _local(path: PathLike) -> Path:
    return Path(str(path).removeprefix("file://"))


def join(base: PathLike, *parts: str) -> str:
    """`base/part/...`: a URI stays a URI (no `s3:` folder), a local path stays local."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts if p)])
    return str(_local(base).joinpath(*parts))


def absolute(path: PathLike) -> str:
    """A local path made absolute (Ray workers run in other folders); a URI as it is."""
    return str(path) if is_remote(path) else str(_local(path).expanduser().resolve())


def name(path: PathLike) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def filesystem(path: PathLike) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it); a clear error when the scheme's package is missing."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(path))
    except (ImportError, ValueError) as e:
        scheme = str(path).split("://", 1)[0]
        need = _EXTRAS.get(scheme, f"the fsspec implementation of {scheme}://")
        raise ConfigError(
            str(path), [f"cannot open {scheme}:// paths ({e}): install {need}"]
        ) from e


def exists(path: PathLike) -> bool:
    """Whether `path` exists now (never answered from a cached listing of its folder)."""
    if not is_remote(path):
        return _local(path).exists()
    fs, p = filesystem(path)
    fs.invalidate_cache(p)  # another process (a Ray worker) may have written it since
    return bool(fs.exists(p))


def makedirs(path: PathLike) -> None:
    """Create a local folder; on object stores folders need no creating."""
    if not is_remote(path):
        _local(path).mkdir(parents=True, exist_ok=True)


def listdir(path: PathLike) -> list[str]:
    """Names of the files directly in `path` (sorted; [] if it does not exist)."""
    if not is_remote(path):
        p = _local(path)
        return sorted(f.name for f in p.iterdir() if f.is_file()) if p.is_dir() else []
    fs, p = filesystem(path)
    try:
        entries = fs.ls(p, detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(name(e["name"]) for e in entries if e.get("type") == "file")


def glob(path: PathLike, pattern: str) -> list[str]:
    """Files in `path` whose names match `pattern` (fnmatch), as full paths/URIs, sorted."""
    import fnmatch

    return [join(path, n) for n in listdir(path) if fnmatch.fnmatch(n, pattern)]


def read_bytes(path: PathLike) -> bytes:
    if not is_remote(path):
        return _local(path).read_bytes()
    fs, p = filesystem(path)
    return fs.cat_file(p)


def read_text(path: PathLike) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: PathLike) -> Any:
    return json.loads(read_text(path))


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write atomically: local temp file + rename; remote one PUT (atomic per object)."""
    if is_remote(path):
        fs, p = filesystem(path)
        fs.pipe_file(p, data)
        return
    target = _local(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
    tmp.write_bytes(data)
    os.replace(tmp, target)


def create_exclusive(path: PathLike, data: bytes) -> bool:
    """Create `path` with `data` unless it exists (False then): O_EXCL locally, a conditional
    PUT (If-None-Match: *) on S3, so two processes racing for it cannot both win."""
    if not is_remote(path):
        _local(path).parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(_local(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return True
    fs, p = filesystem(path)
    try:
        fs.pipe_file(p, data, mode="create")
    except FileExistsError:
        return False
    except OSError as e:  # some SDK versions surface the 412 as a plain OSError
        if "PreconditionFailed" in str(e) or "412" in str(e):
            return False
        raise
    return True


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, indent: int | None = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, default=str) + ("\n" if indent else ""))


def append_text(path: PathLike, text: str) -> None:
    """Append to a local file; on object stores (no append) rewrite the object whole, which
    keeps every version a complete file (fine for the small logs this is used for)."""
    if not is_remote(path):
        _local(path).parent.mkdir(parents=True, exist_ok=True)
        with _local(path).open("a", encoding="utf-8") as f:
            f.write(text)
        return
    old = read_text(path) if exists(path) else ""
    write_text(path, old + text)


def write_table(path: PathLike, table: Any) -> None:
    """A pyarrow table as one Parquet file, atomically (see `write_bytes`)."""
    import pyarrow.parquet as pq

    if is_remote(path):
        fs, p = filesystem(path)
        with fs.open(p, "wb") as f:  # the object appears when the upload completes
            pq.write_table(table, f)
        return
    target = _local(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{target.name}")
    pq.write_table(table, tmp)
    os.replace(tmp, target)


def read_table(path: PathLike, **kwargs: Any) -> Any:
    import pyarrow.parquet as pq

    if not is_remote(path):
        return pq.read_table(str(_local(path)), **kwargs)
    fs, p = filesystem(path)
    with fs.open(p, "rb") as f:
        return pq.read_table(f, **kwargs)


def remove(path: PathLike) -> None:
    """Delete a file or a whole folder; nothing if it is not there."""
    if not is_remote(path):
        p = _local(path)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        return
    fs, p = filesystem(path)
    try:
        fs.rm(p, recursive=True)
    except FileNotFoundError:
        pass
    fs.invalidate_cache()


def upload_dir(local: PathLike, target: PathLike) -> None:
    """Copy a local folder to `target` (replacing what was there). Files first, and
    `config.json` last, so a reader that sees config.json sees a whole model folder."""
    src = _local(local)
    if not is_remote(target):
        dst = _local(target)
        tmp = dst.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{dst.name}")
        shutil.copytree(src, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
        return
    remove(target)
    fs, p = filesystem(target)
    files = sorted(f for f in src.rglob("*") if f.is_file())
    files.sort(key=lambda f: f.name == "config.json")
    for f in files:
        fs.put_file(str(f), f"{p.rstrip('/')}/{f.relative_to(src).as_posix()}")
    fs.invalidate_cache()


def local_copy(path: PathLike, cache: PathLike | None = None) -> str:
    """A local folder with the contents of `path`: itself if local; a remote folder is
    downloaded once into `{cache}/remote/` and reused while its objects' ETags match."""
    if not is_remote(path):
        return str(path)
    from deliberate_ray.models import cache_dir

    fs, p = filesystem(path)
    fs.invalidate_cache()
    listing = fs.find(p, detail=True)
    if not listing:
        raise ConfigError(str(path), ["no files at this URI (was the stage that writes it run?)"])
    tag = json.dumps(sorted((k, str(v.get("ETag", v.get("size")))) for k, v in listing.items()))
    key = hashlib.sha256(f"{path}\n{tag}".encode()).hexdigest()[:16]
    root = Path(cache) if cache else cache_dir() / "remote"
    target = root / f"{name(path)}-{key}"
    if (target / ".complete").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root))
    try:
        for obj in listing:
            rel = obj[len(p.rstrip("/")) + 1 :]
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(obj, str(dest))
        (tmp / ".complete").write_text(str(path))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same download first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def save_figure(fig: Any, path: PathLike, **kwargs: Any) -> None:
    """A matplotlib figure as an image file at `path` (local or remote), atomically."""
    import io

    buf = io.BytesIO()
    fmt = str(path).rsplit(".", 1)[-1] if "." in name(path) else "png"
    fig.savefig(buf, format=fmt, **kwargs)
    write_bytes(path, buf.getvalue())
