"""URI I/O for every stage (local paths and s3://) over pyarrow.fs, with atomic writes.

A reader must never see half an object: local writes go to a temporary name and are renamed,
S3 objects appear only when their upload completes. pyarrow ignores AWS_ENDPOINT_URL, so the
endpoint is resolved here explicitly, from config first and then the standard AWS variables.
"""
from __future__ import annotations

import functools
import json
import os
import posixpath
import re
import struct
import uuid
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from vdistill.errors import DamagedFile
from vdistill.redact import redact_text


@dataclass(frozen=True, repr=False)
class Storage:
    """Picklable handle: Ray workers rebuild the filesystem from these fields.

    Keys may also come as `endpoint_url=http://KEY:SECRET@host`; they are used to connect, never shown.
    """

    endpoint_url: str = ""
    region: str = ""
    access_key: str = ""
    secret_key: str = ""

    @classmethod
    def from_config(cls, cfg: Any = None) -> "Storage":
        """From a StorageConfig (or None), falling back to AWS_* environment variables."""
        env = os.environ
        get = (lambda k: getattr(cfg, k, "") or "") if cfg is not None else (lambda k: "")
        return cls(
            endpoint_url=get("endpoint_url") or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL", ""),
            region=get("region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION", "us-east-1"),
            access_key=get("access_key") or env.get("AWS_ACCESS_KEY_ID", ""),
            secret_key=get("secret_key") or env.get("AWS_SECRET_ACCESS_KEY", ""),
        )

    def __repr__(self) -> str:  # error messages and logs show where, never the keys
        return f"Storage(endpoint_url={redact_text(self.endpoint_url)!r}, region={self.region!r})"

    # ---- resolution -------------------------------------------------------------------------
    def resolve(self, uri: str) -> tuple[pafs.FileSystem, str]:
        """URI -> (filesystem, path inside it)."""
        parsed = urlparse(uri)
        if parsed.scheme == "s3":
            return self._s3(), f"{parsed.netloc}{parsed.path}".rstrip("/")
        if parsed.scheme in ("", "file"):
            path = parsed.path if parsed.scheme == "file" else uri
            return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))
        raise ValueError(f"unsupported URI scheme {parsed.scheme!r} in {uri!r}; use a local path or s3://bucket/key")

    def _endpoint(self) -> tuple[str, str, str, str]:
        """(scheme, host[:port] without credentials, access key, secret key); empty strings where unset."""
        access_key, secret_key = self.access_key, self.secret_key
        if not self.endpoint_url:
            return "", "", access_key, secret_key
        ep = urlparse(self.endpoint_url if "://" in self.endpoint_url else f"https://{self.endpoint_url}")
        if not access_key and ep.username:
            access_key, secret_key = unquote(ep.username), unquote(ep.password or "")
        return ep.scheme, ep.netloc.rsplit("@", 1)[-1], access_key, secret_key

    def _s3(self) -> pafs.S3FileSystem:
        # Delayed open: objects under one part (5 MB) go up as a single PutObject instead of a multipart
        # upload (fewer requests; moto's server answers CompleteMultipartUpload in a form pyarrow 25 rejects).
        kwargs: dict[str, Any] = {"region": self.region or "us-east-1", "allow_delayed_open": True}
        scheme, host, access_key, secret_key = self._endpoint()
        if host:
            kwargs.update(endpoint_override=host, scheme=scheme)
        if access_key:
            kwargs.update(access_key=access_key, secret_key=secret_key)
        return pafs.S3FileSystem(**kwargs)

    @functools.cached_property
    def _boto3(self) -> Any:
        """One boto3 S3 client per handle (thread-safe), built on first use and never pickled. From boto3's default
        session, whose loaded service model makes every client after a process's first cost ~4 ms, not ~100 ms
        (a Ray task deserialises its own handle)."""
        import boto3

        scheme, host, access_key, secret_key = self._endpoint()
        return boto3.client(
            "s3", region_name=self.region or "us-east-1", endpoint_url=f"{scheme}://{host}" if host else None,
            aws_access_key_id=access_key or None, aws_secret_access_key=secret_key or None)

    def __getstate__(self) -> dict[str, str]:  # the fields only: a cached client does not travel to Ray workers
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __setstate__(self, state: dict[str, str]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)

    # ---- reading ----------------------------------------------------------------------------
    def exists(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def is_file(self, uri: str) -> bool:
        fs, path = self.resolve(uri)
        return fs.get_file_info(path).type == pafs.FileType.File

    def size(self, uri: str) -> int:
        fs, path = self.resolve(uri)
        info = fs.get_file_info(path)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(uri)
        return int(info.size)

    def open_input(self, uri: str) -> pafs.NativeFile:
        """Seekable random-access stream (mp4 with `moov` at the end needs seeking)."""
        fs, path = self.resolve(uri)
        return fs.open_input_file(path)

    def read_bytes(self, uri: str) -> bytes:
        """The whole file or object. An s3:// object takes one GET (boto3): pyarrow's S3 files first ask for the
        size with a HEAD, a second request per object. FileNotFoundError when there is none."""
        parsed = urlparse(uri)
        if parsed.scheme != "s3":
            with self.open_input(uri) as f:
                return f.read()
        from botocore.exceptions import ClientError

        try:
            return self._boto3.get_object(Bucket=parsed.netloc, Key=parsed.path.lstrip("/"))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                raise FileNotFoundError(uri) from None
            raise

    def read_text(self, uri: str) -> str:
        return self.read_bytes(uri).decode("utf-8")

    def read_json(self, uri: str) -> Any:
        """The parsed JSON document; DamagedFile naming `uri` when it is not JSON."""
        data = self.read_bytes(uri)
        try:
            return json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise DamagedFile(f"{uri} is damaged: not valid JSON ({exc})") from None

    def read_json_or(self, uri: str, default: Any = None) -> Any:
        return self.read_json(uri) if self.is_file(uri) else default

    def list_files(self, uri: str, recursive: bool = True) -> list[str]:
        """Files under a folder URI, as URIs, sorted; [] when the folder does not exist."""
        return sorted(self.list_file_sizes(uri, recursive))

    def list_file_sizes(self, uri: str, recursive: bool = True) -> dict[str, int]:
        """`{file URI: bytes}` under a folder URI from one listing ({} when the folder does not exist)."""
        fs, path = self.resolve(uri)
        selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
        prefix = uri.rstrip("/")
        return {f"{prefix}/{os.path.relpath(i.path, path)}": int(i.size)
                for i in fs.get_file_info(selector) if i.type == pafs.FileType.File}

    # ---- writing ----------------------------------------------------------------------------
    def write_bytes(self, uri: str, data: bytes, *, durable: bool = True) -> None:
        """Atomic: readers see the old object, nothing, or the whole new one.

        `durable=False` skips the local fsync (the rename still keeps the file whole) for scratch files that a
        machine crash makes worthless anyway, e.g. ingest staging shards, which a re-run deletes.
        """
        fs, path = self.resolve(uri)
        if isinstance(fs, pafs.LocalFileSystem):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            return
        with fs.open_output_stream(path) as out:  # S3: the object appears when the upload completes
            out.write(data)

    def write_text(self, uri: str, text: str) -> None:
        self.write_bytes(uri, text.encode("utf-8"))

    def write_json(self, uri: str, obj: Any) -> None:
        self.write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def upload_file(self, local_path: str, uri: str) -> None:
        with open(local_path, "rb") as f:
            self.write_bytes(uri, f.read())

    def delete(self, uri: str) -> None:
        fs, path = self.resolve(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(path)

    # ---- tensors (safetensors: no pickle, so files from storage cannot run code) --------------
    def write_tensors(self, uri: str, tensors: dict, metadata: dict[str, str] | None = None) -> None:
        from safetensors.torch import save

        self.write_bytes(uri, save({k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, metadata))

    def read_tensors(self, uri: str, names: list[str] | None = None) -> dict:
        """All tensors, or only `names`, reading just their byte ranges (one snapshot of a trajectory)."""
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load

        if names is None:
            try:
                return load(self.read_bytes(uri))
            except SafetensorError as exc:
                raise DamagedFile(f"{uri} is damaged: not a safetensors file ({exc})") from None
        header, base = self._safetensors_header_of(uri)
        out = {}
        with self.open_input(uri) as f:
            for name in names:
                if name not in header:
                    raise KeyError(f"{uri} has no tensor {name!r}")
                entry = header[name]
                start, end = entry["data_offsets"]
                f.seek(base + start)
                raw = bytearray(f.read(end - start))
                if len(raw) != end - start:
                    raise DamagedFile(f"{uri} is damaged: cut short inside tensor {name!r}")
                dtype = _torch_dtype(entry["dtype"])
                out[name] = torch.frombuffer(raw, dtype=dtype).reshape(entry["shape"]) if raw else torch.empty(
                    entry["shape"], dtype=dtype
                )
        return out

    def read_tensor_metadata(self, uri: str) -> dict[str, str]:
        header, _ = self._safetensors_header_of(uri)
        return header.get("__metadata__", {})

    def tensor_names(self, uri: str) -> list[str]:
        header, _ = self._safetensors_header_of(uri)
        return [k for k in header if k != "__metadata__"]

    def _safetensors_header_of(self, uri: str) -> tuple[dict, int]:
        with self.open_input(uri) as f:
            size = f.size()
            try:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > size - 8:
                    raise ValueError(f"header of {length} bytes in a file of {size}")
                header = json.loads(f.read(length))
                if not isinstance(header, dict):
                    raise ValueError("header is not a JSON object")
            except (struct.error, ValueError) as exc:
                raise DamagedFile(f"{uri} is damaged: not a safetensors file ({exc})") from None
            return header, 8 + length


def _torch_dtype(name: str):
    import torch

    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "I8": torch.int8, "BOOL": torch.bool}
    return names[name]


_PATH_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PATH_COMPONENT_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit"


def is_path_component(value: str) -> bool:
    """True when `value` can be one folder name as is: no separator, no `..`, nothing hidden."""
    return bool(_PATH_COMPONENT.match(value))


def path_component(value: str, what: str) -> str:
    """`value` unchanged when safe as one folder name, else ValueError: data values never escape a folder.

    Every value from user data that becomes part of a storage path (split names, ...) goes through here.
    """
    if not is_path_component(value):
        raise ValueError(f"{what} {value!r} cannot be a folder name; allowed: {PATH_COMPONENT_RULE}")
    return value


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])



_AWS_NETWORK = re.compile(r"AWS Error NETWORK_CONNECTION.*?(?:Details: (.*)|$)")


def unreachable_endpoint(exc: BaseException) -> str | None:
    """A short reason when `exc`, or an error it wraps (a Ray task's cause, a chained exception), says the S3 endpoint
    could not be reached (pyarrow's NETWORK_CONNECTION, botocore's connection errors), else None."""
    from botocore.exceptions import ConnectionError as BotoConnectionError

    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, OSError) and (match := _AWS_NETWORK.search(str(err))):
            return (match.group(1) or match.group(0)).strip()
        if isinstance(err, BotoConnectionError):
            return str(err)
        todo += [getattr(err, "cause", None), err.__cause__, err.__context__]
    return None


def location(uri: str) -> str:
    """Where `uri` really points, as one comparable string: a local path or `file:` URI becomes its real absolute
    path (symlinks followed), an s3:// URI `s3://bucket/normalised/key`. Two spellings of one file compare equal,
    and a prefix test on it says whether a file lies inside a folder."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        key = posixpath.normpath("/" + parsed.path.lstrip("/")) if parsed.path.strip("/") else ""
        return f"s3://{parsed.netloc}{key}"
    return os.path.realpath(os.path.expanduser(parsed.path if parsed.scheme == "file" else uri))


def absolute_uri(uri: str) -> str:
    """A local path or `file:` URI made absolute against this process's working directory; other URIs unchanged.

    Ray workers do not run in the driver's working directory (and on a cluster not on its machine), so a
    relative path handed to them resolves somewhere else: the driver makes every local path absolute once.
    """
    if not uri:
        return uri
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return "file://" + os.path.abspath(os.path.expanduser(parsed.path))
    if parsed.scheme == "":
        return os.path.abspath(os.path.expanduser(uri))
    return uri
