"""Policy bundles: a directory of ``.rego`` files plus ``data.json``, and its version.

A bundle's version is a sha256 over its sorted file names and contents, so
every decision names exactly the policy text and data that made it. Files
ending in ``_test.rego`` are Rego unit tests: they are not part of the
enforced policy, so they are neither compiled into it nor hashed.

This module also gives the cheap change signal the gate polls (names, sizes
and mtimes), so a running gate only re-reads and re-hashes a bundle when a
file changed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from sluicegate.streams.errors import SluiceError

DATA_FILE = "data.json"
TEST_SUFFIX = "_test.rego"

Signature = tuple[tuple[str, int, int], ...]


class BundleError(SluiceError):
    """A bundle that cannot be loaded: missing directory, no policy, bad data.json."""


@dataclass(frozen=True, slots=True)
class Bundle:
    """The loaded contents of a bundle directory."""

    path: Path
    # (file name, text), sorted by name: the enforced policy.
    modules: tuple[tuple[str, str], ...]
    data: dict[str, Any]
    data_json: str
    version: str
    # (file name, text) of the ``*_test.rego`` files, for ``sluice policy check``.
    tests: tuple[tuple[str, str], ...] = field(default=())


def default_bundle_path() -> Path:
    """The reference policies shipped with the package."""
    return Path(__file__).resolve().parent / "rego"


def _policy_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".rego")


def signature(path: Path) -> Signature:
    """Names, sizes and mtimes of the bundle's files: changes whenever a file does.

    Cheap (one ``stat`` per file), so it can be polled; a missing directory
    gives an empty signature rather than an error, and the reload that
    follows reports the problem.
    """
    try:
        files = [*_policy_files(path), path / DATA_FILE]
        stats = [(p.name, p.stat()) for p in files if p.exists()]
    except OSError:
        return ()
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def content_version(files: list[tuple[str, bytes]]) -> str:
    """``sha256:<hex>`` over the files, sorted by name.

    Each name and content is length-prefixed, so no two different bundles
    can hash the same by moving bytes between a name and a content.
    """
    digest = hashlib.sha256()
    for name, content in sorted(files):
        raw_name = name.encode()
        digest.update(len(raw_name).to_bytes(8, "big"))
        digest.update(raw_name)
        digest.update(len(content).to_bytes(8, "big"))
        digest.update(content)
    return "sha256:" + digest.hexdigest()


def load_bundle(path: str | Path) -> Bundle:
    """Read and hash the bundle at ``path``; raises :class:`BundleError` if unusable.

    This checks only what can be checked without a Rego engine (files exist,
    ``data.json`` is a JSON object); compiling is the engine's job.
    """
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"policy bundle {root} is not a directory")
    try:
        rego = [(p.name, p.read_bytes()) for p in _policy_files(root)]
        data_path = root / DATA_FILE
        raw_data = data_path.read_bytes() if data_path.exists() else b"{}"
    except OSError as exc:
        raise BundleError(f"cannot read policy bundle {root}: {exc}") from None
    policy = [(name, text) for name, text in rego if not name.endswith(TEST_SUFFIX)]
    tests = [(name, text) for name, text in rego if name.endswith(TEST_SUFFIX)]
    if not policy:
        raise BundleError(f"policy bundle {root} has no .rego files")
    try:
        data = orjson.loads(raw_data)
    except orjson.JSONDecodeError as exc:
        raise BundleError(f"{data_path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{data_path}: must hold a JSON object, not {type(data).__name__}")
    try:
        modules = tuple((name, text.decode()) for name, text in policy)
        test_modules = tuple((name, text.decode()) for name, text in tests)
    except UnicodeDecodeError as exc:
        raise BundleError(f"policy bundle {root}: a .rego file is not UTF-8: {exc}") from None
    version = content_version([*policy, (DATA_FILE, raw_data)])
    return Bundle(
        path=root,
        modules=modules,
        data=data,
        data_json=orjson.dumps(data).decode(),
        version=version,
        tests=test_modules,
    )
