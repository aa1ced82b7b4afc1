"""Pull container images from any OCI / Docker registry, with nothing but Python.

registry_pull authenticates the way the registry asks (anonymous, Bearer token or
Basic), picks the manifest for linux and this machine's architecture (skipping
attestations), downloads layers concurrently and resumably into a content-addressed
store, verifies every byte against its digest and records the image in sqlite3.

    python3 registry_pull.py library/alpine:latest
    python3 registry_pull.py --json --platform linux/arm64 ghcr.io/OWNER/IMAGE:TAG

It needs only the standard library of Python 3.8 or newer: copy this one file to vendor it.
"""
# SPDX-License-Identifier: MIT
#
# Copyright (c) 2026 the registry_pull authors
#
# Permission is hereby granted, free of charge, to any person obtaining a copy of this
# software and associated documentation files (the "Software"), to deal in the Software
# without restriction, including without limitation the rights to use, copy, modify, merge,
# publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons
# to whom the Software is furnished to do so, subject to the following conditions:
#
# The above copyright notice and this permission notice shall be included in all copies or
# substantial portions of the Software.
#
# THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED,
# INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR
# PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE
# FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR
# OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER
# DEALINGS IN THE SOFTWARE.

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.client
import io
import ipaddress
import json
import os
import posixpath
import random
import re
import shutil
import socket
import stat
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
import zlib
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple, Union
from typing import TYPE_CHECKING as _TYPE_CHECKING

if _TYPE_CHECKING:  # for annotations: tarfile is imported where a tar is read or written, argparse in main
    import argparse
    import tarfile

__all__ = [
    "pull",
    "pull_platforms",
    "pull_many",
    "copy",
    "main",
    "PullResult",
    "LayerResult",
    "Reference",
    "Platform",
    "parse_reference",
    "parse_platform",
    "host_platform",
    "default_home",
    "check_digest",
    "parse_manifest",
    "Manifest",
    "Descriptor",
    "select_platform",
    "parse_www_authenticate",
    "verify_signature",
    "SignatureError",
    "find_credentials",
    "Credentials",
    "export_oci_layout",
    "export_docker_archive",
    "export_files",
    "export_tar",
    "extract_rootfs",
    "inspect",
    "inspect_raw",
    "list_tags",
    "images",
    "remove",
    "referrers",
    "collect_garbage",
    "verify",
    "PullError",
    "UsageError",
    "InvalidReference",
    "AuthError",
    "NotFound",
    "NoMatchingPlatform",
    "IntegrityError",
    "DigestMismatch",
    "SizeMismatch",
    "RegistryError",
    "StorageError",
    "UnsupportedError",
    "Interrupted",
    "__version__",
]
__version__ = "0.3.3"


class _Log:
    """The ``registry_pull`` logger (``logging.getLogger("registry_pull")``), made at the first
    message that is said: a run with nothing to say never imports logging (it and what it brings
    are a twentieth of a warm re-pull). Under ``main`` the command line's level filters first and
    its stderr handler is added with the first message it lets through."""

    DEBUG, INFO, WARNING, ERROR = 10, 20, 30, 40

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logger: Any = None
        self.cli_level: Optional[int] = None  # set by main for its run
        self.handler: Any = None
        self.old_level = 0

    def _get(self) -> Any:
        with self.lock:
            if self.logger is None:
                import logging
                self.logger = logging.getLogger("registry_pull")
            if self.cli_level is not None and self.handler is None:
                import logging
                self.handler = logging.StreamHandler(sys.stderr)
                self.handler.setFormatter(_Formatter())
                self.old_level = self.logger.level
                self.logger.addHandler(self.handler)
                self.logger.setLevel(self.cli_level)
            return self.logger

    def _say(self, level: int, msg: str, args: Tuple[Any, ...]) -> None:
        if self.cli_level is not None and level < self.cli_level:
            return
        self._get().log(level, msg, *args)

    def debug(self, msg: str, *args: Any) -> None:
        self._say(self.DEBUG, msg, args)

    def info(self, msg: str, *args: Any) -> None:
        self._say(self.INFO, msg, args)

    def warning(self, msg: str, *args: Any) -> None:
        self._say(self.WARNING, msg, args)

    def command_line(self, level: Optional[int]) -> None:
        """main's run begins (``level``: what it lets through to stderr) or ends (None)."""
        with self.lock:
            if level is None and self.handler is not None:
                self.logger.removeHandler(self.handler)
                self.logger.setLevel(self.old_level)
            self.cli_level, self.handler = level, None


log = _Log()

# --------------------------------------------------------------------------- Constants

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_OCI_EMPTY = "application/vnd.oci.empty.v1+json"  # the config (and layer) of an artifact with none
MT_DOCKER_SCHEMA1 = (
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
)
INDEX_TYPES = (MT_OCI_INDEX, MT_DOCKER_LIST)
MANIFEST_TYPES = (MT_OCI_MANIFEST, MT_DOCKER_MANIFEST)
LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
)
# One request answers with whichever shape the reference points at (OCI-NOTES: media types).
MANIFEST_ACCEPT = ", ".join(INDEX_TYPES + MANIFEST_TYPES)

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # what registries must accept and containerd enforces
CHUNK = 1024 * 1024
MAX_JOBS = 32
MAX_REDIRECTS = 5
TIMEOUT = 60.0  # seconds without a byte before a connection counts as failed
JOBS = 6  # parallel blob transfers by default (skopeo's too): small layers over a long round trip need them
WARM_WAIT = 1.0  # seconds a request waits for a connection whose handshake is already under way

# Retries: each request is tried RETRIES+1 times; waits double from RETRY_BASE up to
# RETRY_MAX (with jitter), and a Retry-After is honoured up to RETRY_AFTER_MAX.  With the
# defaults one request gives up after at most about 1+2+4+8+16 = 31 s of waiting
# (Retry-After: at most 5 x 60 s).
RETRIES = 5
RETRY_BASE = 1.0
RETRY_MAX = 16.0
RETRY_AFTER_MAX = 60.0
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)
# A request that timed out (TIMEOUT without a byte) is tried once more, not RETRIES times:
# a host that accepts connections and never answers costs 2 x TIMEOUT, not 6.
TIMEOUT_RETRIES = 1
# A download that receives fewer than STALL_BYTES in STALL_SECONDS has stalled: it is cut
# and resumed like a lost connection (a server dripping a byte a minute cannot hold a pull).
STALL_SECONDS = 30.0
STALL_BYTES = 16 * 1024
# Tag lists: at most this many pages and tags (a server must not keep a listing going forever).
MAX_TAG_PAGES = 10000
MAX_TAGS = 1000000
# inspect: the sizes of at most this many platforms of an index (a manifest fetch each).
INSPECT_SIZES = 32
# Progress without a terminal: a total line at most this often (seconds) while bytes arrive.
PROGRESS_INTERVAL = 10.0

_ANNOTATION_REF_TYPE = "vnd.docker.reference.type"
_DOCKER_HUB = "docker.io"
_DOCKER_HUB_ENDPOINT = "registry-1.docker.io"

# --------------------------------------------------------------------------- Errors


class PullError(Exception):
    """Base class for everything registry_pull raises; ``exit_code`` is the CLI's exit status.

    The message (``str(e)``) is one line for a person; servers' words in it are made printable.
    """

    exit_code = 1


class UsageError(PullError):
    """A bad argument: an option, a platform, a mirror URL, an output path (exit 2)."""

    exit_code = 2


class InvalidReference(UsageError):
    """The image reference does not follow distribution/reference's grammar (exit 2)."""


class AuthError(PullError):
    """The registry or its token service refused us (401/403), we had no credentials where it
    wants some, a credential helper failed, or a redirect target asked for credentials (exit 3)."""

    exit_code = 3


class NotFound(PullError):
    """The repository, tag, digest or a blob does not exist on the registry (exit 4)."""

    exit_code = 4


class NoMatchingPlatform(NotFound):
    """No image of the reference runs on the wanted platform (exit 4); ``available`` lists what it has."""

    def __init__(self, reference, wanted, available, hint=""):
        have = ", ".join(available) if available else "none"
        super().__init__("%s has no image for %s (it has: %s)%s"
                         % (reference, wanted, have, "; " + hint if hint else ""))
        self.wanted, self.available = wanted, list(available)


class IntegrityError(PullError):
    """Bytes from the registry are not what was promised, or are malformed or hostile: a digest
    or size mismatch, bad JSON, a layer that climbs out of the root (exit 5)."""

    exit_code = 5


class DigestMismatch(IntegrityError):
    """A blob or manifest hashed to another digest than promised (``digest``, ``actual``); exit 5."""

    def __init__(self, what, digest, actual):
        super().__init__(
            "%s %s hashed to %s: the download is corrupt and was discarded" % (what, digest, actual)
        )
        self.digest, self.actual = digest, actual


class SizeMismatch(IntegrityError):
    """A blob's length differs from its descriptor (``expected``, ``actual``); exit 5."""

    def __init__(self, what, digest, expected, actual, sent="the registry sent %s: discarded"):
        super().__init__(
            "%s %s: expected %d bytes, %s" % (what, digest, expected, sent % (actual,))
        )
        self.digest, self.expected, self.actual = digest, expected, actual


class RegistryError(PullError):
    """The registry is unreachable, its TLS certificate is not trusted, it keeps failing after
    the retries, it redirects somewhere refused, or --timeout was reached (exit 6)."""

    exit_code = 6


class StorageError(PullError):
    """The local file system refused: HOME or an output not writable, disk full, a file size
    limit, a planted symbolic link, an sqlite3 error (exit 7)."""

    exit_code = 7


class UnsupportedError(PullError):
    """Something valid we do not handle: a schema 1 manifest, an artifact that is no image, an
    unknown media type or digest algorithm, a zstd layer without a decoder (exit 1)."""

    exit_code = 1


class SignatureError(PullError):
    """The image is not signed by any of the keys given (exit 8): no output was written and no
    image recorded (its verified blobs may stay in the store)."""

    exit_code = 8


class Interrupted(PullError):
    """The pull was cancelled (Ctrl-C, or the caller's ``cancel`` event); partial downloads are
    kept and resume next time (exit 130)."""

    exit_code = 130


class _Pattern:
    """A regular expression compiled at its first use: a run that never needs it (most never
    parse a challenge or a PEM key) does not pay for compiling it at start."""

    def __init__(self, pattern: str, flags: int = 0) -> None:
        self.args: Tuple[str, int] = (pattern, flags)
        self.compiled: Any = None

    def __getattr__(self, name: str) -> Any:  # match, fullmatch, sub...: the compiled pattern's
        if self.compiled is None:
            self.compiled = re.compile(*self.args)
        return getattr(self.compiled, name)


_UNPRINTABLE = _Pattern("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _printable(text: object, limit: int = 300) -> str:
    """A string from a server made safe for a terminal: control characters escaped
    (no escape sequence reaches the screen), length capped."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "..."
    if text.isprintable():  # every character of _UNPRINTABLE is one isprintable() refuses
        return text  # (and the pattern, compiled, costs 3 ms of a warm re-pull)
    return _UNPRINTABLE.sub(lambda m: "\\x%02x" % ord(m.group()) if ord(m.group()) < 0x100
                            else "\\u%04x" % ord(m.group()), text)


# --------------------------------------------------------------------------- References

class _Record:
    """A value class, as ``dataclasses`` would make it, without importing it (and ``inspect``, ``ast``
    and ``dis`` with it) at start: the fields are the class's annotated attributes in order, their
    class values the defaults; instances compare and hash by their fields and are read-only unless
    the class says ``frozen=False``; ``replace(**changes)`` gives a changed copy; names in
    ``_hidden`` stay out of the repr (secrets)."""

    _fields: Tuple[str, ...] = ()
    _defaults: Dict[str, Any] = {}
    _frozen = True
    _hidden: Tuple[str, ...] = ()

    def __init_subclass__(cls, frozen: bool = True, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        inherited = cls._fields  # a subclass keeps its parent's fields first
        cls._fields = inherited + tuple(f for f in cls.__dict__.get("__annotations__", {}) if f not in inherited)
        cls._defaults = dict(cls._defaults, **{f: cls.__dict__[f] for f in cls._fields if f in cls.__dict__})
        cls._frozen = frozen
        if not frozen:
            setattr(cls, "__hash__", None)  # mutable: unhashable, as a dataclass

    def __init__(self, *args: Any, **kw: Any) -> None:
        fields = self._fields
        if len(args) > len(fields):
            raise TypeError("%s takes %d arguments, %d given" % (type(self).__name__, len(fields), len(args)))
        values = dict(zip(fields, args))
        for name, value in kw.items():
            if name not in fields or name in values:
                raise TypeError("%s: unexpected or repeated argument %r" % (type(self).__name__, name))
            values[name] = value
        for name in fields:
            if name not in values:
                if name not in self._defaults:
                    raise TypeError("%s: missing argument %r" % (type(self).__name__, name))
                values[name] = self._defaults[name]
            object.__setattr__(self, name, values[name])

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise AttributeError("cannot assign to field %r of a %s" % (name, type(self).__name__))
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise AttributeError("cannot delete field %r of a %s" % (name, type(self).__name__))
        object.__delattr__(self, name)

    def _values(self) -> Tuple[Any, ...]:
        return tuple(getattr(self, f) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return self._values() == tuple(getattr(other, f) for f in self._fields)

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return "%s(%s)" % (type(self).__name__, ", ".join(
            "%s=%r" % (f, getattr(self, f)) for f in self._fields if f not in self._hidden))

    def replace(self, **changes: Any) -> Any:
        """A copy with ``changes`` (as ``dataclasses.replace``)."""
        values = dict(zip(self._fields, self._values()))
        values.update(changes)
        return type(self)(**values)

    def as_dict(self) -> Dict[str, Any]:
        """The fields, by name (nested records stay records)."""
        return dict(zip(self._fields, self._values()))


_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH_RE = re.compile(r"^%s(?:/%s)*$" % (_COMPONENT, _COMPONENT))
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(
    r"^(?:(?P<name>[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*)"
    r"|\[(?P<ip6>[0-9A-Fa-f:]+)\])(?::(?P<port>[0-9]+))?$"
)
_DIGEST_RE = re.compile(r"^(?P<algo>[a-z0-9]+(?:[.+_-][a-z0-9]+)*):(?P<hex>[a-zA-Z0-9=_-]+)$")
_DIGEST_HEX = {"sha256": 64, "sha512": 128}


def check_digest(digest: Any, what: str = "digest") -> Tuple[str, str]:
    """Validate ``ALGO:HEX`` strictly (it ends up in file paths); return (algo, hex)."""
    if not isinstance(digest, str):
        raise IntegrityError("%s is not a string: %r" % (what, digest))
    m = _DIGEST_RE.fullmatch(digest)
    if not m:
        raise IntegrityError("invalid %s %r" % (what, digest[:200]))
    algo, hexpart = m.group("algo"), m.group("hex")
    if algo not in _DIGEST_HEX:
        raise UnsupportedError("unsupported digest algorithm %r in %s %s" % (algo, what, digest[:200]))
    if len(hexpart) != _DIGEST_HEX[algo] or not re.fullmatch(r"[0-9a-f]+", hexpart):
        raise IntegrityError(
            "invalid %s %r: %s needs %d lowercase hex digits" % (what, digest[:200], algo, _DIGEST_HEX[algo])
        )
    return algo, hexpart


class Reference(_Record):
    """A normalised image reference: ``registry/repository[:tag][@digest]``."""

    registry: str
    repository: str
    tag: Optional[str] = None
    digest: Optional[str] = None

    @property
    def ref(self) -> str:
        """What to ask the registry for: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def name(self) -> str:
        return "%s/%s" % (self.registry, self.repository)

    @property
    def endpoint(self) -> str:
        """host[:port] to connect to (docker.io is served by registry-1.docker.io)."""
        return _DOCKER_HUB_ENDPOINT if self.registry == _DOCKER_HUB else self.registry

    def __str__(self):
        s = self.name
        if self.tag:
            s += ":" + self.tag
        if self.digest:
            s += "@" + self.digest
        return s


def parse_reference(text: str) -> Reference:
    """Parse ``[REGISTRY/]PATH[:TAG][@DIGEST]`` the way Docker does; raise InvalidReference."""

    def bad(why):
        return InvalidReference("invalid reference %r: %s" % (text[:300], why))

    if not isinstance(text, str) or not text:
        raise bad("empty")
    if text != text.strip() or any(c.isspace() for c in text):
        raise bad("contains white space")
    if re.fullmatch(r"[a-f0-9]{64}", text):
        raise bad("it is ambiguous: 64 hex digits look like an image ID, not a name (write NAME@sha256:%s)" % text)
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        try:
            check_digest(digest)
        except PullError as e:
            raise bad("digest: %s" % e) from None
    tag = None
    slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > slash:
        rest, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG_RE.fullmatch(tag):
            raise bad("tag %r must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}" % tag[:200])
    parts = rest.split("/")
    registry = _DOCKER_HUB
    # distribution/reference: the first component is a host when it has a dot, a port, any
    # upper-case letter, or is localhost.
    first = parts[0]
    if len(parts) > 1 and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        registry = parts[0]
        parts = parts[1:]
        m = _HOST_RE.fullmatch(registry)
        if not m:
            raise bad("registry host %r is not a host name or [IPv6] address" % registry)
        port = m.group("port")
        if port is not None and not (port.isdigit() and 0 < int(port) < 65536 and port[0] != "0"):
            raise bad("port %r is not between 1 and 65535" % port)
        if m.group("ip6"):
            try:
                ipaddress.IPv6Address(m.group("ip6"))
            except ValueError:
                raise bad("%r is not an IPv6 address" % m.group("ip6")) from None
        if registry == "index.docker.io":  # kept as typed otherwise, as distribution/reference does
            registry = _DOCKER_HUB
    path = "/".join(parts)
    if not path:
        raise bad("no repository name")
    if path != path.lower() and _PATH_RE.fullmatch(path.lower()):
        raise bad("repository name must be lowercase")
    if not _PATH_RE.fullmatch(path):
        raise bad("repository name %r has characters outside [a-z0-9._-/]" % path[:200])
    if registry == _DOCKER_HUB and "/" not in path:
        path = "library/" + path
    if len(path) > 255:  # the repository path, not the host (distribution/reference, 2024)
        raise bad("repository name is longer than 255 characters")
    if tag is None and digest is None:
        tag = "latest"
    return Reference(registry, path, tag, digest)


class Platform(_Record):
    """An OCI platform; ``os_version``/``os_features`` matter for Windows images."""

    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: Tuple[str, ...] = ()

    def normalized(self) -> Platform:
        """containerd's normal form: aliases mapped, lower case, the implied variant written
        out (arm64 = arm64/v8, arm = arm/v7, amd64 = amd64/v1), so equal means equal."""
        os_, arch, variant = _normalize_platform(self.os, self.architecture, self.variant)
        variant = variant or {"arm64": "v8", "arm": "v7", "amd64": "v1"}.get(arch, "")
        return self.replace(os=os_, architecture=arch, variant=variant)

    def __str__(self):
        s = "%s/%s" % (self.os, self.architecture)
        s = s + "/" + self.variant if self.variant else s
        return s + ":" + self.os_version if self.os_version else s


def _normalize_platform(os_: str, arch: str, variant: str) -> Tuple[str, str, str]:
    """Aliases and case as containerd normalises them (platforms/database.go)."""
    os_, arch, variant = os_.lower(), arch.lower(), variant.lower()
    if os_ == "macos":
        os_ = "darwin"
    if arch == "i386":
        return os_, "386", ""
    if arch in ("x86_64", "x86-64", "amd64"):
        return os_, "amd64", "" if variant == "v1" else variant
    if arch in ("aarch64", "arm64"):
        variant = {"8": "", "v8": "", "v8.0": "", "9": "v9", "9.0": "v9", "v9.0": "v9"}.get(variant, variant)
        return os_, "arm64", variant
    if arch == "armhf":
        return os_, "arm", "v7"
    if arch == "armel":
        return os_, "arm", "v6"
    if arch == "arm":
        return os_, "arm", {"": "v7", "7": "v7", "5": "v5", "6": "v6", "8": "v8"}.get(variant, variant)
    return os_, arch, variant


# What a host can run, best first: containerd's platform vector (platforms/compare.go), which
# `docker pull` ranks an index by.  An exact match is always first; then, per architecture:
#   amd64/vN  -> amd64/vN-1 ... amd64/v1, then 386
#   arm/vN    -> arm/vN-1 ... arm/v5 (v5 is the floor)
#   arm64/v8.m -> arm64/v8.m-1 ... arm64/v8, then arm/v8 ... arm/v5
#   arm64/v9.m -> arm64/v9.m-1 ... arm64/v9, arm64/v8.min(m+5, 9) ... arm64/v8, then arm/v8 ... arm/v5
#                 (a bare arm64/v9 then also takes arm/v9, as containerd's vector does)
# Every other architecture runs only itself.
def _platform_vector(arch: str, variant: str) -> List[Tuple[str, str]]:
    m = re.fullmatch(r"v(\d+)(?:\.(\d+))?", variant)
    if arch == "amd64" and m and not m.group(2):
        return [("amd64", "v%d" % n) for n in range(int(m.group(1)), 0, -1)] + [("386", "")]
    if arch == "arm" and m and not m.group(2):
        return [("arm", "v%d" % n) for n in range(int(m.group(1)), 4, -1)] or [("arm", variant)]
    if arch == "arm64" and m and int(m.group(1)) in (8, 9):
        major, minor = int(m.group(1)), int(m.group(2) or 0)
        out = [("arm64", "v%d.%d" % (major, n) if n else "v%d" % major) for n in range(minor, -1, -1)]
        if major == 9:
            out += [("arm64", "v8.%d" % n if n else "v8") for n in range(min(minor + 5, 9), -1, -1)]
        arm_top = 9 if (major, m.group(2)) == (9, None) else 8
        return out + [("arm", "v%d" % n) for n in range(arm_top, 4, -1)]
    return [(arch, variant)]


def _windows_build(version: str) -> Optional[int]:
    parts = version.split(".")
    return int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None


def _os_version_matches(want: str, have: str) -> bool:
    """containerd's rule: no version wanted or none given matches; Windows builds before
    20348 must be equal, from 20348 on any build from 20348 up to the wanted one runs."""
    if not want or not have:
        return True
    w, h = _windows_build(want), _windows_build(have)
    if w is None or h is None:
        return want == have
    if w < 20348:
        return w == h
    return 20348 <= h <= w


_MACHINE_ARCH = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "arm64": ("arm64", ""),
    "armv8l": ("arm", "v7"),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "x86": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "loongarch64": ("loong64", ""),
}


def host_platform() -> Platform:
    """linux and this machine's architecture (``platform.machine()`` in containerd's terms):
    the platform pulled when none is given."""
    if hasattr(os, "uname"):
        machine = os.uname().machine  # what platform.machine() says there, without importing it
    else:  # Windows
        import platform
        machine = platform.machine()
    return _machine_platform(machine)


def _machine_platform(machine: str) -> Platform:
    arch, variant = _MACHINE_ARCH.get(machine.lower(), (machine.lower(), ""))
    return Platform("linux", arch, variant)


_KNOWN_OS = ("aix", "android", "darwin", "dragonfly", "freebsd", "illumos", "ios", "js", "linux", "netbsd",
             "openbsd", "plan9", "solaris", "wasip1", "windows", "zos")
_KNOWN_ARCH = ("386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle", "ppc64",
               "ppc64le", "riscv64", "s390x", "sparc64", "wasm")


def parse_platform(text: str) -> Platform:
    """A --platform as containerd and Docker read it: ``OS/ARCH[/VARIANT]``, a bare ``ARCH``
    (linux) or ``OS`` (this machine's architecture), ``OS(VERSION)/ARCH`` (containerd) or
    ``OS/ARCH[/VARIANT]:VERSION`` (crane); aliases and case normalised (x86_64, aarch64, armhf...)."""
    def bad():
        return UsageError("invalid platform %r: expected OS/ARCH[/VARIANT] (e.g. linux/arm64, linux/arm/v7), a bare "
                          "ARCH, or windows(10.0.17763)/amd64" % (_printable(text, 100),))

    if not isinstance(text, str):
        raise bad()
    spec: str = text
    version: str = ""
    features: Tuple[str, ...] = ()
    m = re.fullmatch(r"([^:]+/[^:]+):([A-Za-z0-9_.-]+)", text)
    if m:
        spec, version = m.group(1), m.group(2)
    parts = spec.split("/")
    m = re.fullmatch(r"([A-Za-z0-9_-]+)(?:\(([A-Za-z0-9_.%+-]*)\))?", parts[0])
    if len(parts) > 3 or not m or not all(re.fullmatch(r"[A-Za-z0-9_.-]+", p) for p in parts[1:]):
        raise bad()
    if m.group(2):
        inner = urllib.parse.unquote(m.group(2)).split("+")
        version, features = version or inner[0], tuple(f for f in inner[1:] if f)
    first = m.group(1).lower()
    if len(parts) == 1:
        if first in _KNOWN_OS or first == "macos":
            host = host_platform()
            os_, arch, variant = _normalize_platform(first, host.architecture, host.variant)
        else:
            os_, arch, variant = _normalize_platform("linux", first, "")
            if arch not in _KNOWN_ARCH or m.group(2) is not None:
                raise bad()
    else:
        os_, arch, variant = _normalize_platform(first, parts[1], parts[2] if len(parts) == 3 else "")
        if len(parts) == 3 and arch == "arm64" and not variant:
            variant = "v8"  # as written
    return Platform(os_, arch, variant, version, features)


_RECORDED_PLATFORMS: Dict[Optional[str], Platform] = {}


def _recorded_platform(text: Optional[str]) -> Platform:
    """A platform as the images table records it: os/arch[/variant][:os.version] (the few a
    store holds are made once: index.json has one per image)."""
    plat = _RECORDED_PLATFORMS.get(text)
    if plat is None:
        spec, _, version = (text or "").partition(":")
        parts = (spec + "//").split("/")
        plat = Platform(parts[0], parts[1], parts[2], version)
        if len(_RECORDED_PLATFORMS) < 256:
            _RECORDED_PLATFORMS[text] = plat
    return plat


def _is_loopback(host: str) -> bool:
    host = _split_hostport(host)[0]
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _split_hostport(hostport: str) -> Tuple[str, Optional[int]]:
    if hostport.startswith("["):
        end = hostport.find("]")
        host, rest = hostport[1:end], hostport[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") else None
    if hostport.count(":") == 1:
        host, port = hostport.split(":")
        return host, int(port) if port.isdigit() else None
    return hostport, None


# --------------------------------------------------------------------------- Transport & auth

_AUTH_PARAM_RE = _Pattern(r'\s*([A-Za-z0-9_.-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^,\s]*)\s*(,|$)')


def parse_www_authenticate(value: str) -> List[Tuple[str, Dict[str, str]]]:
    """Split a WWW-Authenticate header into [(scheme, {param: value}), ...] (RFC 7235)."""
    challenges: List[Tuple[str, Dict[str, str]]] = []
    if not isinstance(value, str):
        return challenges
    pos, n = 0, len(value)
    while pos < n:
        m = re.compile(r"[\s,]*([A-Za-z][A-Za-z0-9_.+-]*)").match(value, pos)
        if not m or not m.group(1):
            break
        scheme, pos = m.group(1).lower(), m.end()
        params: Dict[str, str] = {}
        while pos < n:
            pm = _AUTH_PARAM_RE.match(value, pos)
            if not pm:
                break
            key, raw = pm.group(1).lower(), pm.group(2)
            if raw.startswith('"'):
                raw = re.sub(r"\\(.)", r"\1", raw[1:-1])
            params[key] = raw
            pos = pm.end()
            # A bare token after a comma starts the next challenge, not a parameter.
            nxt = re.compile(r"\s*([A-Za-z0-9_.-]+)\s*=").match(value, pos)
            if not nxt:
                break
        challenges.append((scheme, params))
        if pos < n and not value[pos:].strip(" ,"):
            break
    return challenges


class Credentials(_Record, frozen=False):
    _hidden = ("password", "identity_token")

    username: str = ""
    password: str = ""
    identity_token: str = ""
    source: str = ""

    def __bool__(self):
        return bool(self.username or self.password or self.identity_token)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def _read_auth_file(path: str) -> Optional[dict]:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise UsageError("cannot read credentials file %s: %s" % (path, e.__class__.__name__)) from None
    return data if isinstance(data, dict) else None


def _auth_keys(registry: str) -> List[str]:
    if registry == _DOCKER_HUB:
        return ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"]
    return [registry, "https://" + registry, "http://" + registry]


def _match_auths(auths: Any, registry: str, repository: Optional[str] = None) -> Optional[dict]:
    if not isinstance(auths, dict):
        return None
    keys = _auth_keys(registry)
    # containers-auth.json: HOST/NAMESPACE[/REPO] keys, the most specific first.
    parts = (repository or "").split("/") if repository else []
    for n in range(len(parts), 0, -1):
        entry = auths.get("%s/%s" % (registry, "/".join(parts[:n])))
        if isinstance(entry, dict):
            return entry
    for key in keys:
        if isinstance(auths.get(key), dict):
            return auths[key]
    for key, entry in auths.items():  # "https://host/v1/" and similar spellings
        if not isinstance(entry, dict) or not isinstance(key, str):
            continue
        host, _, path = key.split("://", 1)[-1].partition("/")
        if path.strip("/") not in ("", "v1", "v2"):
            continue  # a namespace key (HOST/ORG) covers only that namespace: matched above
        if host.lower() in (k.split("://", 1)[-1] for k in keys):
            return entry
    return None


def _from_auth_entry(entry: dict, source: str) -> Optional[Credentials]:
    if entry.get("identitytoken"):
        return Credentials(
            str(entry.get("username") or ""), identity_token=str(entry["identitytoken"]), source=source
        )
    if entry.get("auth"):
        try:
            user, _, pw = base64.b64decode(str(entry["auth"])).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            raise UsageError("malformed 'auth' entry in %s" % source) from None
        return Credentials(user, pw, source=source)
    if entry.get("username") or entry.get("password"):
        return Credentials(str(entry.get("username") or ""), str(entry.get("password") or ""), source=source)
    return None


def _run_helper(helper: str, registry: str, source: str) -> Optional[Credentials]:
    program = "docker-credential-" + helper
    server = "https://index.docker.io/v1/" if registry == _DOCKER_HUB else registry
    if not shutil.which(program):
        raise AuthError("credential helper %s (named in %s) is not on PATH" % (program, source))
    import subprocess  # here, not at start: most pulls run no helper
    try:
        proc = subprocess.run(
            [program, "get"], input=server.encode(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60
        )
    except (OSError, subprocess.SubprocessError) as e:
        raise AuthError("credential helper %s failed: %s" % (program, e.__class__.__name__)) from None
    if proc.returncode != 0:
        if b"credentials not found" in (proc.stdout + proc.stderr).lower():
            return None
        raise AuthError("credential helper %s exited with status %d" % (program, proc.returncode))
    try:
        data = json.loads(proc.stdout.decode("utf-8"))
        user, secret = str(data.get("Username") or ""), str(data.get("Secret") or "")
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise AuthError("credential helper %s printed something other than JSON credentials" % program) from None
    if user == "<token>":
        return Credentials("", identity_token=secret, source=program)
    return Credentials(user, secret, source=program)


def find_credentials(registry: str, env: Optional[Mapping[str, str]] = None,
                     repository: Optional[str] = None) -> Optional[Credentials]:
    """The credentials for ``registry`` from Podman's and Docker's files (README: Credentials).

    Podman's files may key entries by ``HOST/NAMESPACE``: with ``repository`` the most
    specific key that covers it wins; otherwise the first source that has the host.
    """
    env = os.environ if env is None else env
    assert env is not None
    home = env.get("HOME") or os.path.expanduser("~")
    podman = []
    if env.get("REGISTRY_AUTH_FILE"):
        podman.append(env["REGISTRY_AUTH_FILE"])
    if env.get("XDG_RUNTIME_DIR"):
        podman.append(os.path.join(env["XDG_RUNTIME_DIR"], "containers", "auth.json"))
    for path in podman:
        data = _read_auth_file(path)
        entry = _match_auths(data.get("auths"), registry, repository) if data else None
        creds = _from_auth_entry(entry, path) if entry else None
        if creds:
            return creds
    docker_dir = env.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    path = os.path.join(docker_dir, "config.json")
    data = _read_auth_file(path)
    if not data:
        return None
    helpers = _dict_at(data, "credHelpers")
    for key in _auth_keys(registry):
        if helpers.get(key):
            return _try_helper(str(helpers[key]), registry, path)
    entry = _match_auths(data.get("auths"), registry, repository)
    creds = _from_auth_entry(entry, path) if entry else None
    if creds:
        return creds
    if data.get("credsStore"):
        return _try_helper(str(data["credsStore"]), registry, path)
    return None


def _try_helper(helper: str, registry: str, source: str) -> Optional[Credentials]:
    """A helper's credentials; one that is missing or fails is a warning, and the pull goes on
    anonymously (a home copied from Docker Desktop names "desktop"): it matters only if the
    registry then refuses, and that error follows."""
    try:
        return _run_helper(helper, registry, source)
    except AuthError as e:
        log.warning("%s; going on without credentials for %s", e, registry)
        return None


def _registry_error(body: bytes) -> Tuple[str, str]:
    """(code, message) from a registry's JSON error body, if it has one, made printable."""
    try:
        err = json.loads(body[:65536].decode("utf-8"))["errors"][0]
        return _printable(err.get("code", ""), 100), _printable(err.get("message", ""), 300)
    except Exception:  # any shape at all: it is only used to word a message
        return "", ""


class _Pool:
    """Idle keep-alive connections by (kind, host:port, CONNECT tunnel), shared by a pull's
    threads: the registry, its token service and a blob CDN each pay their TCP and TLS
    handshakes once per parallel stream, not once per request."""

    def __init__(self):
        self._idle: Dict[Tuple[str, str, Optional[str]], List[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)  # a warmed connection arrived (or failed)
        self._warming: Dict[Tuple[str, str, Optional[str]], int] = {}  # handshakes under way, by key
        self._closed = False
        self.opened = 0  # connections opened (-v says how many; the benchmark counts them)
        self.requests = 0  # requests sent through any client of this pool

    def get(self, key):
        """An idle connection for ``key`` that the server has not closed meanwhile, or None. One
        being warmed is waited for, briefly (its handshake began before any new one could): a
        cold pull's blob requests take the connections opened for them, not as many again."""
        import select

        deadline = time.monotonic() + WARM_WAIT
        while True:
            with self._lock:
                while not self._idle.get(key) and self._warming.get(key) and time.monotonic() < deadline:
                    self._ready.wait(max(0.0, deadline - time.monotonic()))
                conns = self._idle.get(key)
                conn = conns.pop() if conns else None
            if conn is None:
                return None
            if _idle_alive(conn.sock, select):
                return conn
            conn.close()

    def warm(self,
             key: Tuple[str, str, Optional[str]],
             make: Callable[[], http.client.HTTPConnection],
             n: int) -> None:
        """Open ``n`` connections for ``key`` in the background (their TCP and TLS handshakes
        overlap the manifest requests, so the first blob requests find them ready)."""
        def one():
            conn: Optional[http.client.HTTPConnection] = make()
            assert conn is not None
            try:
                conn.connect()
            except Exception:  # a connection that could not be made: the request makes its own
                conn.close()
                conn = None
            with self._lock:
                self._warming[key] -= 1
                if conn is not None:
                    self.opened += 1
                    if not self._closed:
                        self._idle.setdefault(key, []).append(conn)
                        conn = None
                self._ready.notify_all()
            if conn is not None:
                conn.close()  # the pull is over
        with self._lock:
            self._warming[key] = self._warming.get(key, 0) + n
        for _ in range(n):
            threading.Thread(target=one, name="registry_pull-connect", daemon=True).start()

    def count_opened(self) -> None:
        with self._lock:
            self.opened += 1

    def count_request(self) -> None:
        with self._lock:
            self.requests += 1

    def put(self, key, conn):
        with self._lock:
            if not self._closed:
                self._idle.setdefault(key, []).append(conn)
                return
        conn.close()  # the pull is over

    def close(self):
        with self._lock:
            self._closed = True
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for conn in conns:
            conn.close()


def _idle_alive(sock: Any, select: Any) -> bool:
    """Is an idle connection still usable? Readable while idle means the server closed it (or
    broke the protocol), except for TLS records that carry no data (a TLS 1.3 session ticket)."""
    try:
        if sock is None:
            return False
        if not select.select([sock], [], [], 0)[0]:
            return True
        if not hasattr(sock, "pending"):  # plain TCP: EOF or stray bytes
            return False
        import ssl

        timeout = sock.gettimeout()
        sock.setblocking(False)
        try:
            sock.recv(1)  # data or EOF: either way not reusable
            return False
        except ssl.SSLWantReadError:
            return True  # only TLS bookkeeping was there
        finally:
            sock.settimeout(timeout)
    except (OSError, ValueError):
        return False


class _Watchdog:
    """Shuts a connection's socket down when its time is up, so that http.client's own loops
    (endless ``100 Continue`` interim answers, a header line dripped a byte at a time, endless
    chunked trailer lines) cannot outlast a deadline, however a server drips: the blocked read
    returns and the request fails as a time-out. One daemon thread for the whole process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._armed: Dict[int, Tuple[float, Any]] = {}
        self._fired: Set[int] = set()
        self._next = 0
        self._wake_at = 0.0  # when the thread looks next (a later deadline need not wake it)
        self._thread: Optional[threading.Thread] = None

    def arm(self, conn: Any, deadline: float) -> int:
        """Watch ``conn`` (an http.client connection) until disarm(); returns the token."""
        with self._lock:
            self._next += 1
            token = self._next
            self._armed[token] = (deadline, conn)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="registry_pull-watchdog", daemon=True)
                self._thread.start()
            early = deadline < self._wake_at
        if early:
            self._wake.set()
        return token

    def disarm(self, token: int) -> bool:
        """Stop watching; True when the deadline had already cut the connection."""
        with self._lock:
            self._armed.pop(token, None)
            if token in self._fired:
                self._fired.discard(token)
                return True
        return False

    def _run(self) -> None:
        while True:
            now = time.monotonic()
            with self._lock:
                due = [t for t, (when, _) in self._armed.items() if when <= now]
                conns = [self._armed.pop(t)[1] for t in due]
                self._fired.update(due)
                wait = max(0.01, min(min((w for w, _ in self._armed.values()), default=now + 1.0) - now, 1.0))
                self._wake_at = now + wait
            for conn in conns:
                sock = getattr(conn, "sock", None)
                try:
                    if sock is not None:
                        sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile: nothing left to stop
            self._wake.wait(wait)
            self._wake.clear()


_WATCHDOG = _Watchdog()


class _KeepAlive:
    """urllib handler mixin: HTTP/1.1 requests over the pool's connections (urllib's own
    handlers send ``Connection: close`` and open a connection per request).  Proxies keep
    working: plain HTTP through the proxy's connection, HTTPS through a CONNECT tunnel."""

    def __init__(self, pool, *args, **kw):
        super().__init__(*args, **kw)
        self.pool = pool

    def _pooled(self, conn_class, req, **conn_args):
        host = req.host
        if not host:
            raise urllib.error.URLError("no host given")
        # An HTTPS request through a proxy goes to the proxy (req.host) and tunnels to its own host.
        own = urllib.parse.urlsplit(req.full_url).netloc
        tunnel = own if req.type == "https" and host != own else None
        key = (conn_class.__name__, host, tunnel)
        headers = dict(req.unredirected_hdrs)
        headers.update((k, v) for k, v in req.headers.items() if k not in headers)
        headers = dict((k.title(), v) for k, v in headers.items())
        tunnel_headers = {}
        if tunnel and "Proxy-Authorization" in headers:  # for the CONNECT, not the tunnelled request
            tunnel_headers["Proxy-Authorization"] = headers.pop("Proxy-Authorization")
        for attempt in (1, 2):
            conn = self.pool.get(key) if attempt == 1 else None  # the retry: a fresh connection
            reused = conn is not None
            if conn is None:
                conn = conn_class(host, timeout=req.timeout, blocksize=CHUNK, **conn_args)
                if tunnel:
                    conn.set_tunnel(tunnel, headers=tunnel_headers)
                self.pool.count_opened()
                log.debug("new connection to %s", _printable(tunnel or host, 100))
            elif conn.sock is not None:
                conn.sock.settimeout(req.timeout)
            # The whole answer's head (status line, interim answers, headers) within the
            # request's time-out, however slowly it drips.
            token = _WATCHDOG.arm(conn, time.monotonic() + (req.timeout or TIMEOUT))
            try:
                conn.request(req.get_method(), req.selector, req.data, headers,
                             encode_chunked=req.has_header("Transfer-encoding"))
                resp = conn.getresponse()
            except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError) as e:
                conn.close()  # RemoteDisconnected is a ConnectionResetError
                if _WATCHDOG.disarm(token):
                    raise urllib.error.URLError(socket.timeout("no complete answer in %gs" % req.timeout))
                if reused and attempt == 1 and req.get_method() in ("GET", "HEAD"):
                    continue  # closed while idle (nginx, S3 front ends do): once more, on a fresh connection
                raise urllib.error.URLError(e)
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                if _WATCHDOG.disarm(token):
                    raise urllib.error.URLError(socket.timeout("no complete answer in %gs" % req.timeout))
                if isinstance(e, http.client.InvalidURL):
                    raise
                raise urllib.error.URLError(e)
            except BaseException:
                conn.close()
                _WATCHDOG.disarm(token)
                raise
            _WATCHDOG.disarm(token)
            break
        resp.url = req.get_full_url()
        resp.msg = resp.reason
        resp.rp_pooled = (self.pool, key, conn)  # given back by _Response.close
        return resp


class _HTTPHandler(_KeepAlive, urllib.request.HTTPHandler):
    def http_open(self, req):
        return self._pooled(http.client.HTTPConnection, req)


def _https_handler(pool, context):
    """A pooled HTTPS handler (defined on demand: without ssl, urllib has no HTTPSHandler)."""
    class _HTTPSHandler(_KeepAlive, urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self._pooled(http.client.HTTPSConnection, req, context=context)

    return _HTTPSHandler(pool, context=context)


class _Response:
    """An HTTP response with its final URL; closes its connection when done."""

    def __init__(self, raw, url):
        self.raw, self.url = raw, url
        self.host = urllib.parse.urlsplit(url).netloc
        self.sent_auth: Optional[str] = None
        self.own = True  # answered by the registry's own host, not a redirect target
        self.cancel: Optional[_Cancel] = None
        self.status = raw.status
        self.headers = raw.headers

    def header(self, name: str, default: str = "") -> str:
        return self.raw.headers.get(name, default) or default

    def challenges(self) -> List[Tuple[str, Dict[str, str]]]:
        """Every challenge of every WWW-Authenticate header (RFC 7235 allows several)."""
        found: List[Tuple[str, Dict[str, str]]] = []
        for value in self.raw.headers.get_all("WWW-Authenticate") or []:
            found += parse_www_authenticate(value)
        return found

    def _conn(self) -> Any:
        pooled = getattr(self.raw, "rp_pooled", None)
        return pooled[2] if pooled else None

    def read1(self, n: int) -> bytes:
        """What has arrived of the body, up to ``n`` bytes, at once. A read the server holds
        longer than TIMEOUT without an answer (or past --timeout) inside http.client's own loops, e.g.
        chunked trailer lines without end, is cut: the connection is shut and socket.timeout raised."""
        deadline = time.monotonic() + TIMEOUT
        if self.cancel is not None and self.cancel.deadline is not None:
            deadline = min(deadline, self.cancel.deadline)
        conn = self._conn()
        token = _WATCHDOG.arm(conn, deadline) if conn is not None else None
        try:
            data = self.raw.read1(n)
        except (OSError, http.client.HTTPException):
            if token is not None and _WATCHDOG.disarm(token):
                raise socket.timeout("the answer was held without progress") from None
            raise
        if token is not None and _WATCHDOG.disarm(token):
            raise socket.timeout("the answer was held without progress")
        return data

    def read(self, limit: int) -> bytes:
        """The whole body, refusing one longer than ``limit``; a body that stalls (the stall
        rule) or outlives --timeout is given up, not waited for byte by byte."""
        chunks, got = [], 0
        stall = _Stall()
        while True:
            if self.cancel is not None:
                self.cancel.check()
            try:
                chunk = self.read1(min(CHUNK, limit + 1 - got))
            except socket.timeout:
                self.close()
                raise RegistryError("%s: the answer stalled" % _redact(self.url)) from None
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if got > limit:
                self.close()
                raise IntegrityError("%s: the answer is larger than %d bytes" % (_redact(self.url), limit))
            stalled = stall.check(len(chunk))
            if stalled:
                self.close()
                raise RegistryError("%s: the answer %s" % (_redact(self.url), stalled))
        return b"".join(chunks)

    def excerpt(self, limit: int = 65536) -> bytes:
        """The start of an error body (to word a message), then closed; never raises."""
        try:
            return self.read(limit)
        except (PullError, OSError, http.client.HTTPException):
            return b""
        finally:
            self.close()

    def close(self):
        """Done with it: a connection whose answer was read to the end goes back to the pool
        (a short rest is read first); any other is closed, never reused half-read."""
        pooled = getattr(self.raw, "rp_pooled", None)
        reuse = False
        try:
            if pooled is not None and not self.raw.will_close and pooled[2].sock is not None:
                pooled[2].sock.settimeout(1.0)  # a short rest comes at once, or the connection goes
                token = _WATCHDOG.arm(pooled[2], time.monotonic() + 2.0)
                left = 65536
                while not self.raw.isclosed() and left > 0:
                    length = self.raw.length
                    if length is not None and length > left:
                        break
                    data = self.raw.read(min(left, 16384))
                    if not data:
                        break
                    left -= len(data)
                reuse = not _WATCHDOG.disarm(token) and self.raw.isclosed()
            self.raw.close()
        except Exception:  # a broken connection is simply not reused
            reuse = False
        if pooled is not None:
            pool, key, conn = pooled
            self.raw.rp_pooled = None
            if reuse:
                pool.put(key, conn)
            else:
                conn.close()


def _redact(url: str) -> str:
    """A URL without its query (signed object-storage URLs carry credentials there)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "(a malformed URL)"
    host = parts.netloc.rsplit("@", 1)[-1]  # no user:password@
    return _printable(urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", "")), 300)


def _is_public_address(host: str) -> Optional[bool]:
    """True/False for an address literal or a resolvable name; None if it does not resolve."""
    try:
        addrs = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, None)
        except OSError:
            return None
        addrs = [ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos]
    return all(a.is_global for a in addrs) if addrs else None


class _Cancel:
    """One attempt's cancellation: its own flag (a failed download stops its siblings), the
    caller's ``cancel`` event (never set by us), and the whole pull's deadline (--timeout)."""

    def __init__(self, parent: Any = None, deadline: Optional[float] = None, limit: Optional[float] = None) -> None:
        self.parent, self.deadline, self.limit = parent, deadline, limit
        self.event = threading.Event()

    def set(self):
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set() or (self.parent is not None and self.parent.is_set())

    def check(self):
        """Raise Interrupted when cancelled, RegistryError when the deadline has passed."""
        if self.is_set():
            raise Interrupted("interrupted")
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise RegistryError("timeout: the pull did not finish within %g s (--timeout)" % (self.limit or 0))

    def bound(self, seconds: float) -> float:
        """``seconds``, cut to what is left before the deadline."""
        self.check()
        if self.deadline is None:
            return seconds
        return max(0.05, min(seconds, self.deadline - time.monotonic()))

    def wait(self, seconds: float) -> None:
        """Sleep ``seconds``; raise as check() does as soon as that applies."""
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            self.event.wait(min(left, 0.1))


class _Stall:
    """The stall rule: fewer than STALL_BYTES arriving in STALL_SECONDS is a stall."""

    def __init__(self):
        self.since, self.bytes = time.monotonic(), 0

    def check(self, n: int) -> Optional[str]:
        """Count ``n`` bytes more; a reason when the transfer has stalled, else None."""
        self.bytes += n
        now = time.monotonic()
        if now - self.since < STALL_SECONDS:
            return None
        if self.bytes < STALL_BYTES:
            return "stalled (%d bytes in %.0fs)" % (self.bytes, now - self.since)
        self.since, self.bytes = now, 0
        return None


class _Retryable(Exception):
    def __init__(self, message, retry_after=None, timed_out=False):
        super().__init__(message)
        self.retry_after, self.timed_out = retry_after, timed_out


class _Retry:
    """The one retry policy (README: what happens when things go wrong).

    A transient failure is tried again RETRIES times in a row, waiting twice as long each time
    from RETRY_BASE up to RETRY_MAX (with jitter), or as long as the server's Retry-After says
    (at most RETRY_AFTER_MAX); progress (a download that got somewhere) resets the count.  A
    time-out is retried TIMEOUT_RETRIES times only.  Each retry is said on stderr.
    """

    def __init__(self, cancel: _Cancel, who: str) -> None:
        self.cancel, self.who = cancel, who
        self.failures = self.timeouts = 0

    def progressed(self):
        self.failures = 0

    def again(self,
              why: str,
              retry_after: Optional[float] = None,
              timed_out: bool = False,
              wait_scale: float = 1.0) -> None:
        """Wait before the next try, or raise RegistryError when the tries are spent."""
        self.failures += 1
        self.timeouts += bool(timed_out)
        if self.failures > RETRIES or self.timeouts > TIMEOUT_RETRIES:
            raise RegistryError("%s failed after %d tries: %s" % (self.who, self.failures, why))
        delay = retry_after if retry_after is not None else _backoff(self.failures) * wait_scale
        log.warning("%s; retrying in %.1fs (%d/%d)", why, delay, self.failures, RETRIES)
        self.cancel.wait(delay)


def _backoff(attempt: int) -> float:
    delay = min(RETRY_MAX, RETRY_BASE * (2 ** (attempt - 1)))
    return delay * (0.5 + random.random() / 2)


def _retry_after(value: str) -> Optional[float]:
    if not value:
        return None
    try:
        return max(0.0, min(RETRY_AFTER_MAX, float(value.strip())))
    except ValueError:
        pass
    try:
        import email.utils

        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, min(RETRY_AFTER_MAX, when.timestamp() - time.time()))
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


_CHECK_NETWORK = "check the name, HTTPS_PROXY / NO_PROXY, or pull through a mirror (--mirror, REGISTRY_PULL_MIRRORS)"


def _network_failure(err: BaseException,
                     host: str,
                     ca_file: Optional[str] = None,
                     fail_fast: bool = False) -> Tuple[str, bool]:
    """(why a request to ``host`` failed, whether it timed out); raises RegistryError at once
    for what no retry mends: an untrusted certificate, a name that does not resolve, a network
    that is unreachable, and (``fail_fast``: a mirror, which is a shortcut, not a place to
    wait) anything at all."""
    reason = getattr(err, "reason", err)  # URLError wraps the socket or ssl error
    if _is_cert_error(reason):
        raise RegistryError(_tls_message(host, reason, ca_file)) from None
    name = _split_hostport(host)[0] if host else host
    if isinstance(reason, socket.gaierror):
        raise RegistryError("cannot resolve %s (%s): %s" % (name, _reason_text(reason), _CHECK_NETWORK)) from None
    if getattr(reason, "errno", None) in (errno.ENETUNREACH, errno.EHOSTUNREACH):
        raise RegistryError("cannot reach %s (%s): %s" % (name, _reason_text(reason), _CHECK_NETWORK)) from None
    why = _reason_text(reason)
    if fail_fast:
        raise RegistryError("cannot reach %s: %s" % (host, why)) from None
    if isinstance(reason, ConnectionRefusedError) and host and _is_loopback(host):
        # Nothing listens on that port of this machine: a typo, not an outage (skopeo: at once).
        raise RegistryError("cannot reach %s: connection refused (nothing listens there: check the port)"
                            % host) from None
    return why, isinstance(reason, socket.timeout)


def _is_cert_error(err: object) -> bool:
    try:
        import ssl
    except ImportError:
        return False
    if isinstance(err, ssl.SSLCertVerificationError):
        return True
    return isinstance(err, ssl.CertificateError) or "CERTIFICATE_VERIFY_FAILED" in str(err)


def _tls_message(host: str, err: object, ca_file: Optional[str] = None) -> str:
    detail = _printable(getattr(err, "verify_message", None) or str(err), 200)
    if ca_file:
        return ("TLS certificate of %s is not trusted (%s), although --ca-file %s was loaded: check that it "
                "holds the CA that signed the registry's certificate, or --insecure to skip verification"
                % (host, detail, ca_file))
    return ("TLS certificate of %s is not trusted (%s): pass --ca-file FILE or set SSL_CERT_FILE, "
            "or --insecure to skip verification" % (host, detail))


def _reason_text(err: object) -> str:
    if isinstance(err, socket.timeout):
        return "timed out"
    text = getattr(err, "strerror", None) or str(err) or err.__class__.__name__
    return _printable(text, 200)


def _certs_dir(host: str, cert_dir: Optional[str] = None) -> Optional[str]:
    """The certificate directory for ``host`` (HOST[:PORT]), as containers/image and Docker look
    it up: ``cert_dir`` itself when given (it replaces the lookup), else the first of
    $XDG_CONFIG_HOME/containers/certs.d, /etc/containers/certs.d, /etc/docker/certs.d that has
    a HOST[:PORT] directory (the first found is used, not a merge)."""
    if cert_dir is not None:
        if not os.path.isdir(cert_dir):
            raise UsageError("--cert-dir %s is not a directory" % cert_dir)
        return cert_dir
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    for base in (os.path.join(config, "containers", "certs.d"), "/etc/containers/certs.d", "/etc/docker/certs.d"):
        path = os.path.join(base, host)
        if os.path.isdir(path):
            return path
    return None


def _dir_certs(directory: str) -> Tuple[List[str], Optional[Tuple[str, str]]]:
    """(CA files ``*.crt``, the client pair ``NAME.cert`` + ``NAME.key``) of a certs.d directory."""
    names = sorted(os.listdir(directory))
    cas = [os.path.join(directory, n) for n in names if n.endswith(".crt")]
    pairs = []
    for n in names:
        stem = n[:-5] if n.endswith(".cert") else n[:-4] if n.endswith(".key") else None
        if stem is None:
            continue
        other = stem + (".key" if n.endswith(".cert") else ".cert")
        if other not in names:
            raise UsageError("%s has %s without %s: a client certificate needs both" % (directory, n, other))
        if n.endswith(".cert"):
            pairs.append((os.path.join(directory, n), os.path.join(directory, other)))
    if len(pairs) > 1:
        log.warning("%s holds %d client certificates; %s is used", directory, len(pairs), pairs[0][0])
    return cas, pairs[0] if pairs else None


def _ssl_context(verify: bool, ca_file: Optional[str], host: str, certs: Optional[str] = None) -> Any:
    """A TLS context that verifies as Go, curl and skopeo do (or not at all: --insecure), with
    the CAs and client certificate of ``certs`` (the host's certs.d directory) where given."""
    try:
        import ssl
    except ImportError:
        raise RegistryError("this Python has no ssl module: HTTPS to %s is impossible" % host) from None
    cas, pair = _dir_certs(certs) if certs else ([], None)
    if not verify:  # --insecure, by the user's explicit choice
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        ctx = ssl.create_default_context()  # honours SSL_CERT_FILE / SSL_CERT_DIR
        # Python 3.13 turned on OpenSSL's strict X.509 checks, which refuse private CAs that
        # Go, curl and skopeo accept (e.g. a non-critical basicConstraints): verify as they do.
        ctx.verify_flags &= ~getattr(ssl, "VERIFY_X509_STRICT", 0)
        sources = [(c, "the CA %s" % c) for c in cas] + ([(ca_file, "--ca-file %s" % ca_file)] if ca_file else [])
        for path, what in sources:
            try:
                ctx.load_verify_locations(cafile=path)
            except (OSError, ssl.SSLError) as e:
                raise UsageError("cannot load %s: %s" % (what, e)) from None
    if pair is not None:  # offered to this host only: each host has a context of its own
        try:
            ctx.load_cert_chain(pair[0], pair[1])
        except (OSError, ssl.SSLError) as e:
            raise UsageError("cannot load the client certificate %s: %s" % (pair[0], e)) from None
        log.debug("client certificate %s for %s", pair[0], _printable(host, 100))
    return ctx


class _Targets:
    """Where a registry may send us (a redirect, a token realm): http(s) only; plain HTTP only
    when the registry itself speaks it or with --insecure; and never from a public registry to
    a private, loopback or link-local address (SSRF)."""

    def __init__(self, endpoint: str, insecure: bool, scheme: Callable[[], Optional[str]]) -> None:
        self.endpoint, self.insecure, self.scheme = endpoint, insecure, scheme
        self.loopback = _is_loopback(endpoint)
        self.public: Optional[bool] = None  # does the registry's own name resolve to public addresses?

    def is_public(self) -> bool:
        if self.public is None:
            self.public = bool(_is_public_address(_split_hostport(self.endpoint)[0]))
        return self.public

    def check(self, url: str, what: str, error: type) -> urllib.parse.SplitResult:
        """``url``'s parts, or ``error`` saying why the registry may not send us there."""
        try:
            parts: Optional[urllib.parse.SplitResult] = urllib.parse.urlsplit(url)
            host = parts.hostname if parts else None
            parts.port if parts else None  # noqa: B018 (raises ValueError for a bad port)
        except ValueError:
            parts, host = None, None
        if parts is None or parts.scheme not in ("http", "https") or not host:
            raise error("%s named an unsupported URL for %s, %s: refused" % (self.endpoint, what, _redact(url)[:100]))
        local = self.loopback and _is_loopback(parts.netloc)  # never leaves this machine
        if parts.scheme == "http" and not (self.insecure or self.scheme() == "http" or local):
            raise error("%s named a plain-HTTP URL for %s (%s): refused" % (self.endpoint, what, _redact(url)))
        if self.is_public() and _is_public_address(host) is False:
            raise error("%s named a non-public address %s for %s: refused"
                        % (self.endpoint, _printable(host, 100), what))
        return parts

    def follow(self, url: str, location: str) -> Tuple[str, bool]:
        """The URL a redirect names, checked; and whether it is the registry's own host."""
        if not location:
            raise RegistryError("%s redirected without a Location" % _redact(url))
        try:
            new = urllib.parse.urljoin(url, location)
        except ValueError:
            new = location
        parts = self.check(new, "a redirect", RegistryError)
        own = parts.netloc.lower() == self.endpoint.lower() and parts.scheme == self.scheme()
        log.debug("redirect to %s", _redact(new))
        return new, own


class _Auth:
    """Who we are to one registry host: its credentials, the challenge it answered, and the
    Bearer tokens it gave (per scope, shared by all download threads, renewed ahead of time).

    Credentials and challenges belong to the registry's own host: a redirect target never
    gets them, and its 401 never starts an authentication (the client sees to that).
    """

    def __init__(self, client: "_Client", credentials: Optional[Credentials]) -> None:
        self.client = client  # sends the token requests; its targets check the realm
        self.credentials = credentials
        self.challenge: Optional[Tuple[str, Dict[str, str]]] = None
        self.hinted = False  # the challenge is the store's memory, not yet this run's own
        self._tokens: Dict[str, Tuple[str, float]] = {}
        self._lock = threading.Lock()  # one token fetch at a time; the others reuse it

    def who(self) -> str:
        c = self.credentials
        return (" as %s" % _printable(c.username, 100)) if c and c.username else " anonymously"

    def remembered(self, kind: Optional[str], realm: Optional[str], service: Optional[str]) -> None:
        """Start from the challenge an earlier pull saw (the store's ``hosts`` row), as a hint:
        Basic credentials go to the registry's own host at once, but a token realm gets
        credentials only once this run's own challenge names it (a registry may have moved its
        token service); an anonymous token is fetched from the remembered realm at once, and a
        realm that fails is dropped for the registry's fresh challenge."""
        if kind == "basic" and self.credentials:
            self.challenge = ("basic", {})
        elif kind == "bearer" and realm and not self.credentials:
            self.challenge = ("bearer", dict([("realm", realm)] + ([("service", service)] if service else [])))
            self.hinted = True

    def probed(self, challenges: List[Tuple[str, Dict[str, str]]]) -> None:
        """The scheme probe's 401 serves the first real request: no second 401 for it."""
        if self.challenge is not None and not self.hinted:
            return
        self.hinted = False
        by_kind = dict((k, p) for k, p in reversed(challenges))
        if "bearer" in by_kind and by_kind["bearer"].get("realm"):
            self.challenge = ("bearer", by_kind["bearer"])
        elif "basic" in by_kind and self.credentials:
            self.challenge = ("basic", by_kind["basic"])

    def header(self, scope: Optional[str]) -> Optional[str]:
        """The Authorization header for a request to the registry's own host, if any."""
        challenge = self.challenge
        if challenge is None:
            return None
        kind, params = challenge
        if kind == "basic":
            c = self.credentials
            return "Basic " + _b64("%s:%s" % (c.username, c.password)) if c else None
        if self.hinted:
            try:
                token = self.token(params, scope, hint=True)
            except PullError as e:
                log.info("the remembered token service of %s failed (%s); asking the registry", self.client.endpoint, e)
                self.challenge, self.hinted = None, False
                return None
        else:
            token = self.token(params, scope)
        return "Bearer " + token if token else None

    def accept(self, challenges: List[Tuple[str, Dict[str, str]]], scope: Optional[str],
               sent_auth: Optional[str]) -> bool:
        """Adopt the registry's challenge; True when a retry with new credentials makes sense.

        A 401 to a Bearer token (expired, revoked: ``error="invalid_token"``) renews that
        token once; threads that were refused the same token share the renewed one.
        """
        by_kind = dict((k, p) for k, p in reversed(challenges))
        if "bearer" in by_kind and by_kind["bearer"].get("realm"):
            params = by_kind["bearer"]
            self.challenge, self.hinted = ("bearer", params), False
            rejected = sent_auth[7:] if sent_auth and sent_auth.startswith("Bearer ") else None
            self.token(params, scope, rejected=rejected)
            return True
        if "basic" in by_kind:
            if not self.credentials or (self.challenge and self.challenge[0] == "basic"):
                return False
            self.challenge = ("basic", by_kind["basic"])
            return True
        if challenges:
            raise AuthError("%s asks for an authentication scheme we do not speak: %s"
                            % (self.client.endpoint, _printable(", ".join(k for k, _ in challenges), 100)))
        return False

    def token(self, params: Dict[str, str], scope: Optional[str], rejected: Optional[str] = None,
              hint: bool = False) -> str:
        scope = scope or params.get("scope") or ""
        key = "%s|%s|%s" % (params.get("realm"), params.get("service", ""), scope)
        with self._lock:
            cached = self._tokens.get(key)
            if cached and cached[0] != rejected and time.time() < cached[1]:
                return cached[0]
            token, lifetime = self.fetch_token(params, scope, hint)
            # Renew ahead of time: a long layer download must not start on a token about to die.
            margin = min(30.0, lifetime / 5.0)
            self._tokens[key] = (token, time.time() + lifetime - margin)
            return token

    def fetch_token(self, params: Dict[str, str], scope: str, hint: bool = False) -> Tuple[str, float]:
        """(token, lifetime in seconds) from the realm the challenge names (``hint``: a realm
        only remembered, which fails at once rather than after retries)."""
        client = self.client
        realm = params.get("realm", "")
        parts = client.targets.check(realm, "its token realm", AuthError)
        service = _printable(parts.hostname, 100)
        query = [("service", params["service"])] if params.get("service") else []
        if scope:
            query += [("scope", s) for s in scope.split(" ")]
        c = self.credentials
        headers = {}
        method, body = "GET", None
        if c and c.identity_token:
            # Docker's OAuth2 refresh-token grant for identity tokens.
            method = "POST"
            form = [("grant_type", "refresh_token"), ("refresh_token", c.identity_token),
                    ("client_id", "registry_pull")] + query
            body = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
            url = realm
        else:
            url = realm + ("&" if parts.query else "?") + urllib.parse.urlencode(query) if query else realm
            if c:
                headers["Authorization"] = "Basic " + _b64("%s:%s" % (c.username, c.password))
        retry = _Retry(client.cancel, "token service %s" % service)
        while True:
            try:
                resp = client.open_once(method, url, headers, data=body)
                try:
                    status, data = resp.status, resp.read(MAX_MANIFEST_BYTES)
                finally:
                    resp.close()
            except (OSError, http.client.HTTPException) as e:
                why, timed_out = _network_failure(e, parts.netloc, client.ca_file, client.mirror or hint)
                retry.again("cannot reach token service %s: %s" % (service, why), timed_out=timed_out)
                continue
            if status == 200:
                break
            if status in RETRY_STATUSES and not hint:
                retry.again("token service %s answered %d" % (service, status),
                            _retry_after(resp.header("Retry-After")))
                continue
            code, msg = _registry_error(data)
            raise AuthError("token service %s refused%s for %s (%d %s)"
                            % (service, self.who(), _printable(scope or "access", 200), status, msg or code or ""))
        return _parse_token(data, service, scope)


def _parse_token(data: bytes, service: str, scope: str) -> Tuple[str, float]:
    try:
        answer = json.loads(data.decode("utf-8"))
        token = answer.get("token") or answer.get("access_token")
        lifetime = float(answer.get("expires_in") or 60)
    except (ValueError, AttributeError, TypeError):
        raise AuthError("token service %s answered something other than a token" % service) from None
    if not isinstance(token, str) or not token:
        raise AuthError("token service %s answered without a token" % service)
    if not re.fullmatch(r"[\x21-\x7e]+", token):  # it goes into a header line as it is
        raise AuthError("token service %s answered a token with characters no header may carry: refused" % service)
    log.debug("token for %s valid %ds", scope or "(no scope)", lifetime)
    return token, max(lifetime, 1.0)


class _Client:
    """Talks to one registry host: its openers and connections, the scheme probe, and the
    request loop (retries, redirects checked by ``targets``, challenges answered by ``auth``).

    Thread-safe: all download threads share one _Client, its ``auth`` and its token cache.
    """

    def __init__(self, registry: str, *, insecure: bool = False, ca_file: Optional[str] = None,
                 credentials: Optional[Credentials] = None, cancel: Any = None, endpoint: Optional[str] = None,
                 scheme: Optional[str] = None, mirror: bool = False, pool: Optional[_Pool] = None,
                 cert_dir: Optional[str] = None) -> None:
        self.registry = registry
        self.cert_dir = cert_dir  # replaces the certs.d lookup, for the registry's own host only
        self.endpoint = endpoint or (_DOCKER_HUB_ENDPOINT if registry == _DOCKER_HUB else registry)
        self.insecure = insecure
        self.ca_file = ca_file
        self.cancel = cancel if isinstance(cancel, _Cancel) else _Cancel(cancel)
        self.mirror = mirror  # a mirror that cannot be reached is skipped at once, not retried
        self.pool = pool if pool is not None else _Pool()
        self.loopback = _is_loopback(self.endpoint)
        self.scheme: Optional[str] = scheme  # None until the probe (or the store) says
        self.targets = _Targets(self.endpoint, insecure, lambda: self.scheme)
        self.auth = _Auth(self, credentials)
        self._preconnect = 0  # connections to open as soon as the scheme is known
        self._lock = threading.Lock()
        self._openers: Dict[Tuple[str, bool, bool, Optional[str]], urllib.request.OpenerDirector] = {}
        self._contexts: Dict[Tuple[bool, Optional[str]], Any] = {}
        self._certs: Dict[str, Optional[str]] = {}

    @property
    def credentials(self) -> Optional[Credentials]:
        return self.auth.credentials

    # -- connections ----------------------------------------------------------------

    def _host_certs(self, host: str) -> Optional[str]:
        """The certs.d directory of ``host`` (--cert-dir for the registry itself), cached."""
        with self._lock:
            if host not in self._certs:
                own = host.lower() == self.endpoint.lower()
                self._certs[host] = _certs_dir(host, self.cert_dir if own else None)
            return self._certs[host]

    def _context(self, verify: bool, host: str) -> Any:
        """The TLS context for ``host``: its own where it has a certs.d directory (its CAs and
        client certificate go to it alone), else one shared by the hosts that have none."""
        certs = self._host_certs(host)
        key = (verify, host.lower() if certs else None)
        with self._lock:
            if key not in self._contexts:
                self._contexts[key] = _ssl_context(verify, self.ca_file, host, certs)
            return self._contexts[key]

    def _opener(self, scheme: str, host: str) -> urllib.request.OpenerDirector:
        verify = not (self.insecure and host == self.endpoint)
        certs = self._host_certs(host) if scheme == "https" else None
        key = (scheme, verify, _is_loopback(host), host.lower() if certs else None)
        ctx = self._context(verify, host) if scheme == "https" else None  # first: without ssl, no HTTPSHandler
        with self._lock:
            opener = self._openers.get(key)
            if opener is None:
                # As Go's http.ProxyFromEnvironment does: loopback is never proxied.
                proxies: Optional[Dict[str, str]] = {} if _is_loopback(host) else None
                # No redirect or error processors: every status comes back as a response,
                # and redirects are followed (and checked) by _request_once.
                handlers = [urllib.request.ProxyHandler(proxies), _HTTPHandler(self.pool)]
                if ctx is not None:
                    handlers.append(_https_handler(self.pool, ctx))
                opener = urllib.request.OpenerDirector()
                for h in handlers:
                    opener.add_handler(h)
                self._openers[key] = opener
        return opener

    def open_once(self, method: str, url: str, headers: Dict[str, str], timeout: float = TIMEOUT,
                  data: Optional[bytes] = None) -> _Response:
        """One request, no retry, redirect or challenge: what the policies above build on."""
        parts = urllib.parse.urlsplit(url)
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        self.pool.count_request()
        try:
            raw = self._opener(parts.scheme, parts.netloc).open(req, timeout=self.cancel.bound(timeout))
        except (ValueError, http.client.InvalidURL):  # refused by http.client: never shown (a secret)
            raise RegistryError("cannot send a request to %s: a header or the URL is malformed"
                                % _printable(parts.netloc, 100)) from None
        log.debug("%s %s -> %s", method, _redact(url), raw.status)
        resp = _Response(raw, url)
        resp.cancel = self.cancel
        return resp

    def base(self) -> str:
        """``scheme://host`` of the registry (probing the scheme on first use)."""
        if self.scheme is None:
            self._discover_scheme()
        return "%s://%s" % (self.scheme, self.endpoint)

    def preconnect(self, n: int) -> None:
        """Open ``n`` connections to the registry ahead of a cold pull's downloads (not through
        a proxy: those are made per request as urllib makes them)."""
        scheme = self.scheme
        if scheme is None:
            self._preconnect = n  # once the probe has found the scheme
            return
        if n <= 0:
            return
        if not self.loopback and urllib.request.getproxies().get(scheme) and \
                not urllib.request.proxy_bypass(_split_hostport(self.endpoint)[0]):
            return
        endpoint = self.endpoint
        if scheme == "https":
            ctx = self._context(not self.insecure, endpoint)
            self.pool.warm(("HTTPSConnection", endpoint, None), lambda: http.client.HTTPSConnection(
                endpoint, timeout=TIMEOUT, context=ctx, blocksize=CHUNK), n)
        else:
            self.pool.warm(("HTTPConnection", endpoint, None),
                           lambda: http.client.HTTPConnection(endpoint, timeout=TIMEOUT, blocksize=CHUNK), n)

    def remembered(self, info: Optional[Tuple[str, Optional[str], Optional[str], Optional[str]]]) -> None:
        """Start from what an earlier pull learnt of this host (the store's ``hosts`` row):
        its scheme, and its challenge, so credentials or a token go with the first request."""
        if not info:
            return
        scheme, kind, realm, service = info
        if scheme in ("http", "https") and self.scheme is None and \
                (scheme == "https" or self.loopback or self.insecure):
            self.scheme = scheme
        self.auth.remembered(kind, realm, service)

    def _discover_scheme(self) -> None:
        """HTTPS, except that loopback (or --insecure) registries may speak plain HTTP.

        Loopback is probed over plain HTTP first: an HTTPS server answers that at once
        (Go's says 400), whereas a plain server handed a TLS hello can wait forever.
        """
        if not (self.loopback or self.insecure):
            self.scheme = "https"
            return
        errors = []
        timed_out = False
        # Both probes at once (the second in a thread): the second costs no round trip more.
        order = ("http", "https") if self.loopback else ("https", "http")
        answers: Dict[str, Any] = {}

        def probe(scheme):
            try:
                answers[scheme] = self.open_once("GET", "%s://%s/v2/" % (scheme, self.endpoint), {}, timeout=10.0)
            except BaseException as e:  # looked at below
                answers[scheme] = e

        second = threading.Thread(target=probe, args=(order[1],), daemon=True)
        second.start()
        probe(order[0])
        for scheme in order:
            if scheme == order[1]:
                while second.is_alive():
                    second.join(0.1)
                    self.cancel.check()
            resp = answers.get(scheme)
            if isinstance(resp, (OSError, http.client.HTTPException)):
                why, slow = _network_failure(resp, self.endpoint, self.ca_file)
                timed_out = timed_out or slow
                errors.append("%s: %s" % (scheme, why))
                continue
            if isinstance(resp, BaseException):
                raise resp
            assert isinstance(resp, _Response)
            if scheme == "http" and resp.status == 400:
                resp.close()
                errors.append("http: 400")
                continue  # an HTTPS server refusing plain HTTP
            log.debug("%s speaks %s", self.endpoint, scheme)
            self.scheme = scheme
            self.preconnect(self._preconnect)
            if resp.status == 401:
                self.auth.probed(resp.challenges())
            resp.close()
            other = answers.get(order[1]) if scheme == order[0] else None
            if isinstance(other, _Response):
                other.close()
            return
        if self.mirror:  # a shortcut, not a place to wait
            raise RegistryError("cannot reach %s (%s)" % (self.endpoint, "; ".join(errors)))
        raise _Retryable("cannot reach %s (%s)" % (self.endpoint, "; ".join(errors)), timed_out=timed_out)

    # -- requests with retries, redirects and auth ------------------------------------

    def request(self, method: str, path: str, *, headers: Optional[Dict[str, str]] = None,
                scope: Optional[str] = None, redirect_ok: bool = True, data: Any = None,
                retries: bool = True) -> _Response:
        """Send a request to the registry, following its redirects and challenges.

        ``data``: the body, bytes or a function that makes it anew for each try (a file opened
        at the right place); ``retries`` False: a transient failure is RegistryError at once (an
        upload that must find out what the registry kept before it goes on).
        Returns any final response with status < 400 (and 404/416 for callers to interpret);
        raises AuthError, NotFound, RegistryError otherwise.
        """
        retry = _Retry(self.cancel, self.endpoint)
        auth_retried = False
        while True:
            self.cancel.check()
            try:
                resp = self._request_once(method, path, dict(headers or {}), scope, redirect_ok, data)
            except _Retryable as e:
                if not retries:
                    raise RegistryError(e.args[0]) from None
                retry.again(e.args[0], e.retry_after, e.timed_out)
                continue
            if resp.status in (401, 403) and not resp.own:
                resp.excerpt()
                raise AuthError("%s, where %s redirected %s, answered %d: registry credentials are never sent to "
                                "another host" % (_printable(resp.host, 100), self.endpoint, path.split("?")[0],
                                                  resp.status))
            if resp.status == 401:
                challenges = resp.challenges()
                body = resp.excerpt()
                if not auth_retried and self.auth.accept(challenges, scope, resp.sent_auth):
                    auth_retried = True
                    continue
                code, msg = _registry_error(body)
                raise AuthError("%s refused access to %s%s (%s)" % (self.endpoint, path.split("?")[0], self.auth.who(),
                                                                    msg or code or "401 Unauthorized"))
            if resp.status == 403:
                code, msg = _registry_error(resp.excerpt())
                raise AuthError("%s denied access to %s (%s)" % (self.endpoint, path, msg or code or "403 Forbidden"))
            return resp

    def _request_once(self, method: str, path: str, headers: Dict[str, str], scope: Optional[str],
                      redirect_ok: bool, data: Any = None) -> _Response:
        url = self.base() + path
        own_host = True
        for _ in range(MAX_REDIRECTS + 1):
            h = dict(headers)
            if own_host:
                auth = self.auth.header(scope)
                if auth:
                    h["Authorization"] = auth
            body = data() if callable(data) else data
            try:
                resp = self.open_once(method, url, h, data=body)
            except (OSError, http.client.HTTPException) as e:  # URLError is an OSError
                why, timed_out = _network_failure(e, urllib.parse.urlsplit(url).netloc, self.ca_file, self.mirror)
                raise _Retryable("cannot reach %s: %s" % (_redact(url), why), timed_out=timed_out) from None
            resp.sent_auth, resp.own = h.get("Authorization"), own_host
            if own_host and resp.header("RateLimit-Remaining"):  # Docker Hub's pull limit, as it counts it
                log.info("%s: pull limit remaining %s", self.endpoint,
                         _printable(resp.header("RateLimit-Remaining"), 60))
            if resp.status in (301, 302, 303, 307, 308) and redirect_ok:
                location = resp.header("Location")
                resp.close()
                url, own_host = self.targets.follow(url, location)
                if resp.status == 303 and method != "HEAD":
                    method, data = "GET", None  # See Other: fetch the named resource
                continue
            if resp.status == 429 and self.registry == _DOCKER_HUB and own_host:
                code, msg = _registry_error(resp.excerpt())
                # Docker Hub's pull limit resets in hours: waiting a minute is not a plan.
                raise RegistryError(
                    "Docker Hub answered 429 (%s): the %s pull limit was reached; log in (--username, or "
                    "docker/podman login) or pull through a mirror (--mirror, REGISTRY_PULL_MIRRORS)"
                    % (msg or code or "too many requests", "anonymous" if not self.credentials else "account's"))
            if resp.status in RETRY_STATUSES:
                retry_after = _retry_after(resp.header("Retry-After"))
                code, msg = _registry_error(resp.excerpt())
                raise _Retryable("%s answered %d %s" % (_redact(url), resp.status,
                                                        msg or code or _printable(resp.raw.reason, 100)), retry_after)
            return resp
        raise RegistryError("%s redirected more than %d times" % (self.endpoint, MAX_REDIRECTS))


# --------------------------------------------------------------------------- Registry
# The distribution spec's endpoints for one repository, each status rule written once: every
# manifest, blob, tag page and referrers list goes through _Repository.


def _answer(resp: _Response, limit: int, what: str, missing: str = "not found", kind: str = "") -> bytes:
    """The whole body of a 200 answer, then closed: NotFound for a 404 (``what: missing (CODE)``),
    RegistryError for another status or a failed read, IntegrityError past ``limit`` bytes
    (``kind`` names the document: "manifest of ")."""
    try:
        if resp.status == 404:
            code, msg = _registry_error(resp.excerpt())
            raise NotFound("%s: %s (%s)" % (what, missing, code or msg or "404"))
        if resp.status != 200:
            raise RegistryError("%s answered %d for %s" % (_printable(resp.host, 100), resp.status, what))
        try:
            return resp.read(limit)
        except IntegrityError:
            raise IntegrityError("%s%s is larger than %d bytes: refused" % (kind, what, limit)) from None
        except (OSError, http.client.HTTPException) as e:
            raise RegistryError("reading the %s%s from %s failed: %s"
                                % (kind, what, _printable(resp.host, 100), _reason_text(e))) from None
    finally:
        resp.close()


class _FileSlice:
    """``length`` bytes of the store's file ``path`` from ``offset``, as a request body that is
    read (CHUNK at a time) while it is sent: an upload never holds a chunk in memory."""

    def __init__(self, path: str, offset: int, length: int) -> None:
        self.fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        self.offset, self.left = offset, length

    def read(self, n: int = -1) -> bytes:
        if self.left <= 0 or self.fd < 0:
            self.close()
            return b""
        n = self.left if n is None or n < 0 else min(n, self.left)
        data = os.pread(self.fd, min(n, CHUNK), self.offset)
        if not data:
            self.close()
            raise StorageError("a blob in the store is shorter than it should be")
        self.offset += len(data)
        self.left -= len(data)
        return data

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()


class _Repository:
    """One repository of a registry, as the distribution spec names its endpoints."""

    def __init__(self, client: _Client, name: str) -> None:
        self.client, self.name = client, name
        self.scope = "repository:%s:pull" % name

    def _request(self, method: str, path: str, headers: Optional[Dict[str, str]] = None) -> _Response:
        return self.client.request(method, "/v2/%s/%s" % (self.name, path), headers=headers, scope=self.scope)

    def manifest(self, ref: str, *, accept: str = MANIFEST_ACCEPT, what: str = "",
                 head_first: Optional[Callable[[str], Optional[bytes]]] = None) -> Tuple[str, bytes, str]:
        """(digest, bytes, content type) of the manifest or index a tag or digest names, verified:
        against the digest asked for, else the registry's Docker-Content-Digest, else named by
        its sha256. With ``head_first`` (digest -> the bytes a store holds, or None) a HEAD asks
        first, and a digest the store holds costs no GET (a warm re-pull's one request)."""
        what = what or "%s:%s" % (self.name, ref)
        is_digest = ref.startswith(tuple(a + ":" for a in _DIGEST_HEX))
        if head_first is not None:
            found = self._head(ref, accept, head_first)
            if found is not None:
                return found
        resp = self._request("GET", "manifests/" + ref, {"Accept": accept})
        missing = "manifest not found" if is_digest else \
            "manifest not found (the tags it has: registry_pull tags %s)" % self.name
        data = _answer(resp, MAX_MANIFEST_BYTES, what, missing, "manifest of ")
        served = resp.header("Docker-Content-Digest").strip()
        if is_digest:
            _verify_bytes("manifest", data, ref)
            digest = ref
        elif served:
            check_digest(served, "Docker-Content-Digest")
            _verify_bytes("manifest", data, served)
            digest = served
        else:
            digest = _hash("sha256", data)
        return digest, data, resp.header("Content-Type")

    def _head(self, ref: str, accept: str,
              stored: Callable[[str], Optional[bytes]]) -> Optional[Tuple[str, bytes, str]]:
        """What a HEAD names, when the store has it; None for the GET to answer. Any HEAD that
        fails (a 404 or 403 where GET works: strict-Accept proxies, some mirrors) falls back to
        GET, as Docker's client does; the GET says what is really wrong."""
        try:
            resp = self._request("HEAD", "manifests/" + ref, {"Accept": accept})
        except AuthError as e:
            log.info("HEAD of %s:%s refused (%s); asking with GET", self.name, ref, e)
            return None
        resp.close()
        digest = resp.header("Docker-Content-Digest").strip()
        if resp.status != 200 or not digest:
            if resp.status != 200:
                log.info("HEAD of %s:%s answered %d; asking with GET", self.name, ref, resp.status)
            return None
        check_digest(digest, "Docker-Content-Digest")
        data = stored(digest)
        return (digest, data, resp.header("Content-Type")) if data is not None else None

    def has_manifest(self, ref: str) -> bool:
        """Does a HEAD find ``ref``? Only a 404 says no (a registry whose HEAD misbehaves is asked
        with GET after all)."""
        try:
            resp = self._request("HEAD", "manifests/" + ref, {"Accept": MANIFEST_ACCEPT})
        except AuthError:
            return True
        resp.close()
        return resp.status != 404

    def blob(self, desc: Descriptor, offset: int = 0, what: str = "blob") -> Tuple[_Response, int]:
        """An open answer carrying ``desc``'s bytes, and the offset they start at: ``offset`` when
        the registry honoured the Range, 0 when it sends the whole blob instead (it ignored the
        Range, refused it with 416, or answered a Content-Range that does not continue it)."""
        size = desc.size
        while True:
            headers = {"Range": "bytes=%d-" % offset} if offset else {}
            resp = self._request("GET", "blobs/" + desc.digest, headers)
            try:
                if resp.status == 404:
                    code, msg = _registry_error(resp.excerpt())
                    raise NotFound("%s %s not found in %s (%s)" % (what, desc.digest, self.name, code or 404))
                if resp.status == 416 and offset:
                    # What we have is not a prefix the server knows: start over.
                    resp.close()
                    offset = 0
                    continue
                if resp.status == 206 and offset:
                    m = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", resp.header("Content-Range").strip())
                    if m and m.group(3) != "*" and int(m.group(3)) != size:
                        raise SizeMismatch(what, desc.digest, size, m.group(3))
                    if not m or int(m.group(1)) != offset:
                        log.info("%s: unusable Content-Range %r; starting over", desc.digest,
                                 _printable(resp.header("Content-Range"), 100))
                        resp.close()
                        offset = 0
                        continue
                    return resp, offset
                if resp.status == 200:
                    length = resp.header("Content-Length").strip()
                    if length.isdigit() and int(length) != size:
                        raise SizeMismatch(what, desc.digest, size, _printable(length, 30))
                    if offset:
                        log.info("%s: server ignored Range; starting over", desc.digest)
                    return resp, 0
                raise RegistryError("%s answered %d for %s %s" % (self.client.endpoint, resp.status, what,
                                                                  desc.digest))
            except BaseException:
                resp.close()
                raise

    def small_blob(self, desc: Descriptor, what: str = "blob") -> bytes:
        """A small blob (a config) read into memory and verified, not stored."""
        if desc.size > MAX_MANIFEST_BYTES:
            raise IntegrityError("%s %s is %d bytes: larger than %d, refused"
                                 % (what, desc.digest, desc.size, MAX_MANIFEST_BYTES))
        resp, _ = self.blob(desc, 0, what)
        data = _answer(resp, desc.size, "%s %s" % (what, desc.digest))
        if len(data) != desc.size:
            raise SizeMismatch(what, desc.digest, desc.size, len(data))
        _verify_bytes(what, data, desc.digest)
        return data

    def tags(self, page_size: int = 1000) -> List[str]:
        """Every tag, following the registry's pagination (``?n=`` and the ``Link`` header, on
        the registry's own host only) to the end."""
        path: Optional[str] = "/v2/%s/tags/list?n=%d" % (self.name, page_size)
        tags: List[str] = []
        seen: Set[str] = set()
        empty = 0
        while path:
            if path in seen or len(seen) >= MAX_TAG_PAGES or len(tags) > MAX_TAGS:
                raise IntegrityError("%s: the tag list never ends (a page links back, or more than %d pages or "
                                     "%d tags)" % (self.name, MAX_TAG_PAGES, MAX_TAGS))
            seen.add(path)
            resp = self.client.request("GET", path, headers={"Accept": "application/json"}, scope=self.scope)
            doc = _loads_json(_answer(resp, MAX_MANIFEST_BYTES, self.name, "repository not found"), "tag list")
            page = doc.get("tags") or []
            if not isinstance(page, list) or not all(isinstance(t, str) for t in page):
                raise IntegrityError("%s: the tag list is not a list of strings" % self.name)
            bad = next((t for t in page if not _TAG_RE.fullmatch(t)), None)
            if bad is not None:
                raise IntegrityError("%s: the tag list holds %r, which is no tag" % (self.name, _printable(bad, 60)))
            tags += page
            path = self._next(resp.header("Link"), path)
            empty = 0 if page else empty + 1
            if path and empty >= 10:
                raise IntegrityError("%s: the tag list sent 10 empty pages in a row, each linking on" % self.name)
        return tags

    def referrers(self, digest: str, artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        """The descriptors of the manifests whose ``subject`` is ``digest`` (OCI 1.1 referrers
        API, every page), or None where the registry has no such API (it answers 404)."""
        check_digest(digest)
        path: Optional[str] = "/v2/%s/referrers/%s" % (self.name, digest) + (
            "?" + urllib.parse.urlencode([("artifactType", artifact_type)]) if artifact_type else "")
        found: List[Descriptor] = []
        seen: Set[str] = set()
        while path:
            if path in seen or len(found) > 100000:
                raise IntegrityError("%s: the referrers list never ends" % self.name)
            seen.add(path)
            resp = self.client.request("GET", path, headers={"Accept": MT_OCI_INDEX}, scope=self.scope)
            if resp.status == 404 and not found:
                resp.excerpt()
                return None
            doc = _loads_json(_answer(resp, MAX_MANIFEST_BYTES, "referrers of %s" % digest), "referrers index")
            entries = _list_at(doc, "manifests")
            for i, entry in enumerate(entries):
                d = Descriptor.parse(entry, "referrer %d of %s" % (i, digest))
                if artifact_type is None or d.artifact_type == artifact_type:  # a registry may ignore the filter
                    found.append(d)
            path = self._next(resp.header("Link"), path)
        return found

    # -- pushing (distribution spec, "push") ---------------------------------------------------

    def _push_scope(self, mount_from: Optional[str] = None) -> str:
        scope = "repository:%s:pull,push" % self.name
        return scope + (" repository:%s:pull" % mount_from if mount_from else "")

    def _push(self, method: str, path: str, headers: Optional[Dict[str, str]] = None, data: Any = None,
              mount_from: Optional[str] = None, retries: bool = True) -> _Response:
        return self.client.request(method, path, headers=headers, scope=self._push_scope(mount_from), data=data,
                                   retries=retries)

    def _session_path(self, location: str, current: str) -> str:
        """An upload Location as a path on the registry's own host (it may be relative)."""
        if not location:
            raise RegistryError("%s opened an upload without a Location" % self.client.endpoint)
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(self.client.base() + current, location))
        if parts.netloc.lower() != self.client.endpoint.lower() or not parts.path.startswith("/v2/"):
            raise UnsupportedError("%s sends uploads to another place (%s): not supported"
                                   % (self.client.endpoint, _redact(location)))
        return parts.path + ("?" + parts.query if parts.query else "")

    def has_blob(self, digest: str) -> bool:
        resp = self._push("HEAD", "/v2/%s/blobs/%s" % (self.name, digest))
        resp.close()
        return resp.status == 200

    def start_upload(self, digest: Optional[str] = None, mount_from: Optional[str] = None) -> Optional[str]:
        """A new upload session's path; None when ``mount_from`` mounted the blob (201)."""
        path = "/v2/%s/blobs/uploads/" % self.name
        if mount_from and digest:
            path += "?mount=%s&from=%s" % (digest, mount_from)  # a digest and a repository path: safe in a query
        resp = self._push("POST", path, {"Content-Type": "application/octet-stream"}, b"", mount_from)
        resp.excerpt()
        if resp.status == 201 and mount_from:
            return None
        if resp.status != 202:
            raise RegistryError("%s answered %d to a new upload in %s"
                                % (self.client.endpoint, resp.status, self.name))
        return self._session_path(resp.header("Location"), path)

    def upload(self, path: str, digest: str, size: int, chunk_size: int, session: Optional[str] = None) -> str:
        """Send the blob file ``path`` (the store's, verified) to ``digest`` in ``self.name``: one
        PUT up to ``chunk_size``, else PATCH chunks (a registry that refuses the first gets one
        PUT); a cut resumes from what the registry says it kept (GET on the session), or starts
        again in a new session where it kept nothing (once per cut). ``session``: one already
        open (a mount the registry answered with an upload). Returns how: "uploaded"."""
        session = session or self.start_upload()
        assert session is not None
        if size <= chunk_size:
            for cut in range(RETRIES + 1):  # a cut PUT: the registry drops the session (2.8: 404), so anew
                try:
                    self._finish(session, digest, path, size, retries=cut == RETRIES)
                    return "uploaded"
                except RegistryError as e:
                    if cut == RETRIES:
                        raise
                    log.warning("upload of %s cut (%s); starting again", digest, e)
                    session = self.start_upload()
                    assert session is not None
            return "uploaded"
        offset, cuts = 0, 0
        while offset < size:
            length = min(chunk_size, size - offset)
            headers = {"Content-Type": "application/octet-stream", "Content-Length": str(length),
                       "Content-Range": "%d-%d" % (offset, offset + length - 1)}
            try:
                resp = self._push("PATCH", session, headers, lambda: _FileSlice(path, offset, length), retries=False)
            except RegistryError as e:
                cuts += 1
                if cuts > RETRIES:
                    raise
                session, offset = self._resume(session, e)
                continue
            resp.excerpt()
            if resp.status == 416 and offset:  # the registry has another idea of where we are: ask it
                cuts += 1
                if cuts > RETRIES:
                    raise RegistryError("%s keeps refusing the chunks of %s (416)" % (self.client.endpoint, digest))
                session, offset = self._resume(session, RegistryError("416"))
                continue
            if resp.status in (400, 404, 405, 415, 416) and offset == 0:
                log.info("%s refuses chunked uploads (%d): one PUT of %s", self.client.endpoint, resp.status, digest)
                self._finish(self.start_upload() or session, digest, path, size)
                return "uploaded"
            if resp.status != 202:
                raise RegistryError("%s answered %d to a chunk of %s" % (self.client.endpoint, resp.status, digest))
            session = self._session_path(resp.header("Location"), session) if resp.header("Location") else session
            offset += length
        self._finish(session, digest, path, 0)
        return "uploaded"

    def _resume(self, session: str, why: Exception) -> Tuple[str, int]:
        """Where a cut upload goes on: the registry's ``Range`` for the session, or a new session from 0."""
        resp = self._push("GET", session)
        resp.excerpt()
        kept = re.fullmatch(r"(?:bytes=)?0-(\d+)", resp.header("Range").strip())
        # "0-0" is what Distribution answers for an empty upload as for a one-byte one: start again.
        if resp.status == 204 and kept and int(kept.group(1)) > 0:
            log.warning("upload cut (%s); resuming at %d", why, int(kept.group(1)) + 1)
            location = resp.header("Location")
            return (self._session_path(location, session) if location else session), int(kept.group(1)) + 1
        log.warning("upload cut (%s) and the registry kept nothing (%d); starting again", why, resp.status)
        fresh = self.start_upload()
        assert fresh is not None
        return fresh, 0

    def _finish(self, session: str, digest: str, blob: str, size: int, retries: bool = True) -> None:
        """Close the upload with a PUT carrying the last ``size`` bytes of ``blob`` (all of it, or none)."""
        path = session + ("&" if "?" in session else "?") + "digest=" + digest  # ALGO:HEX, safe in a query
        start = os.stat(blob).st_size - size
        resp = self._push("PUT", path, {"Content-Type": "application/octet-stream", "Content-Length": str(size)},
                          (lambda: _FileSlice(blob, start, size)) if size else b"", retries=retries)
        if resp.status == 404 and size and not retries:
            resp.excerpt()
            raise RegistryError("%s lost the upload of %s (404)" % (self.client.endpoint, digest))
        code, msg = _registry_error(resp.excerpt())
        if resp.status not in (201, 204):
            raise RegistryError("%s refused blob %s (%d %s)" % (self.client.endpoint, digest, resp.status, msg or code))
        served = resp.header("Docker-Content-Digest").strip()
        if served and served != digest:
            raise IntegrityError("%s stored %s as %s" % (self.client.endpoint, digest, _printable(served, 80)))

    def put_manifest(self, ref: str, media_type: str, data: bytes) -> str:
        """PUT a manifest or index byte for byte under ``ref`` (a tag or its digest)."""
        resp = self._push("PUT", "/v2/%s/manifests/%s" % (self.name, ref), {"Content-Type": media_type}, data)
        code, msg = _registry_error(resp.excerpt())
        if resp.status not in (200, 201, 202):
            raise RegistryError("%s refused the manifest %s:%s (%d %s)" % (self.client.endpoint, self.name, ref,
                                                                           resp.status, msg or code))
        return _hash("sha256", data)

    def _next(self, header: str, current: str) -> Optional[str]:
        """The path of a ``Link: <...>; rel="next"`` on the registry's own host, or None (older
        Quay writes it without the angle brackets). A Link that names a next page in a way that
        cannot be read stops the listing with an error, never silently."""
        m = re.search(r'(?:<([^>]*)>|([^\s<>;,][^\s<>;,]*))\s*;[^,]*\brel="?next"?', header or "")
        if not m:
            if re.search(r'\brel="?next', header or ""):
                raise RegistryError("%s sent a Link to the next page that cannot be read: %s"
                                    % (self.client.endpoint, _printable(header, 200)))
            return None
        client = self.client
        target = m.group(1) if m.group(1) is not None else m.group(2)
        parts = urllib.parse.urlsplit(urllib.parse.urljoin(client.base() + current, target))
        if parts.netloc.lower() != client.endpoint.lower() or not parts.path.startswith("/v2/"):
            raise RegistryError("%s sent a Link to another place (%s): refused" % (client.endpoint, _redact(target)))
        return parts.path + ("?" + parts.query if parts.query else "")


class _StoreRepository:
    """A repository answered from the store alone (``--offline``): tags resolve to what was
    recorded for them, digests to the blobs it holds; nothing is ever sent. What it lacks is
    NotFound, saying so. The same face as _Repository, for the puller."""

    def __init__(self, client: _Client, store: _Store, ref: Reference) -> None:
        self.client, self.store, self.ref, self.name = client, store, ref, ref.repository

    def _absent(self, what: str) -> NotFound:
        return NotFound("%s is not in the store %s (--offline: nothing is fetched)" % (what, self.store.home))

    def manifest(self, ref: str, *, accept: str = MANIFEST_ACCEPT, what: str = "",
                 head_first: Optional[Callable[[str], Optional[bytes]]] = None) -> Tuple[str, bytes, str]:
        what = what or "%s:%s" % (self.name, ref)
        digest = ref if ref.startswith(tuple(a + ":" for a in _DIGEST_HEX)) else \
            self.store.recorded("%s:%s" % (self.ref.name, ref))
        data = self.store.read(digest) if digest else None
        if digest is None or data is None:
            raise self._absent(what)
        _verify_bytes("manifest", data, digest)
        return digest, data, ""

    def blob(self, desc: Descriptor, offset: int = 0, what: str = "blob") -> Tuple[_Response, int]:
        raise self._absent("%s %s of %s" % (what, desc.digest, self.ref))

    def small_blob(self, desc: Descriptor, what: str = "blob") -> bytes:
        data = self.store.read(desc.digest)
        if data is None:
            raise self._absent("%s %s of %s" % (what, desc.digest, self.ref))
        _verify_bytes(what, data, desc.digest)
        return data

    def referrers(self, digest: str, artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        return []


class _FileAnswer:
    """A blob file of a local source, answering as a registry's blob response does (read1,
    close): the puller's downloads, resumes and checks are the same for every source."""

    def __init__(self, fd: int, offset: int) -> None:
        self.fd, self.status, self.host = fd, 206 if offset else 200, "(a local layout)"
        os.lseek(fd, offset, os.SEEK_SET)

    def read1(self, n: int) -> bytes:
        return os.read(self.fd, n)

    def header(self, name: str, default: str = "") -> str:
        return default

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _LayoutReference(Reference):
    """``oci:DIR[:NAME]`` as the store records it (a Reference in every other respect)."""

    def __str__(self) -> str:
        return "oci:%s:%s" % (self.registry[4:], self.tag) if self.tag else "oci:" + self.registry[4:]


def parse_layout_source(text: str) -> Tuple[str, Optional[str]]:
    """``oci:DIR[:NAME]`` -> (DIR, NAME or None): split at the first colon after ``oci:``, as skopeo does."""
    if not text.startswith("oci:") or len(text) == 4:
        raise InvalidReference("invalid source %r: expected oci:DIR[:NAME]" % _printable(text, 200))
    directory, _, name = text[4:].partition(":")
    return directory, name or None


class _LayoutRepository:
    """An OCI image layout as a source (``oci:DIR[:NAME]``: one written by --oci-layout, skopeo
    or buildah, or a store): untrusted input like a registry's. Blobs are opened below DIR
    through descriptors without following links, and verified as they are imported."""

    def __init__(self, client: _Client, directory: str, name: Optional[str]) -> None:
        self.client, self.directory, self.name, self.asked = client, directory, "oci:" + directory, name
        try:
            self.top = _open_dir(directory)
        except OSError as e:
            raise NotFound("oci:%s: %s" % (directory, e.strerror or e)) from None
        index = _loads_json(self._read("index.json", self.top, MAX_MANIFEST_BYTES * 4), "oci:%s index.json" % directory)
        self.entries = [Descriptor.parse(e, "index.json entry") for e in _list_at(index, "manifests")]
        named = [e for e in self.entries if (e.annotations or {}).get(_REF_NAME)]
        if name is None:
            if len(self.entries) != 1:
                raise UsageError("oci:%s holds %d images: name one (oci:%s:NAME); it has %s" % (
                    directory, len(self.entries), directory,
                    ", ".join(sorted(str((e.annotations or {}).get(_REF_NAME)) for e in named)) or "no names"))
            self.chosen = self.entries[0]
        else:
            found = [e for e in named if (e.annotations or {}).get(_REF_NAME) == name]
            if not found:
                raise NotFound("oci:%s has no image named %s" % (directory, _printable(name, 100)))
            self.chosen = found[-1]

    def close(self) -> None:
        os.close(self.top)

    def _read(self, name: str, dir_fd: int, limit: int) -> bytes:
        try:
            fd = _open_regular_at(name, dir_fd)
        except _NotRegular:
            raise IntegrityError("%s: %s is not a regular file: refused" % (self.name, name)) from None
        except FileNotFoundError:
            raise NotFound("%s: %s is missing" % (self.name, name)) from None
        except OSError as e:
            raise IntegrityError("%s: %s cannot be opened (%s): refused" % (self.name, name, e.strerror or e)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IntegrityError("%s: %s is not a regular file: refused" % (self.name, name))
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise IntegrityError("%s: %s is larger than %d bytes: refused" % (self.name, name, limit))
        return data

    def _open_blob(self, digest: str) -> int:
        algo, hexpart = check_digest(digest)
        try:
            blobs = os.open("blobs", _O_DIR, dir_fd=self.top)
            try:
                sub = os.open(algo, _O_DIR, dir_fd=blobs)
            finally:
                os.close(blobs)
            try:
                fd = _open_regular_at(hexpart, sub)
            finally:
                os.close(sub)
        except _NotRegular:
            raise IntegrityError("%s: blob %s is not a regular file: refused" % (self.name, digest)) from None
        except FileNotFoundError:
            raise NotFound("%s: blob %s is missing" % (self.name, digest)) from None
        except OSError as e:  # a link (ELOOP), a directory...: not a blob
            raise IntegrityError("%s: blob %s cannot be opened (%s): refused"
                                 % (self.name, digest, e.strerror or e)) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise IntegrityError("%s: blob %s is not a regular file: refused" % (self.name, digest))
        return fd

    def manifest(self, ref: str, *, accept: str = MANIFEST_ACCEPT, what: str = "",
                 head_first: Optional[Callable[[str], Optional[bytes]]] = None) -> Tuple[str, bytes, str]:
        if ref.startswith(tuple(a + ":" for a in _DIGEST_HEX)):
            desc = next((e for e in self.entries if e.digest == ref), None)
            digest, media_type = ref, desc.media_type if desc else ""
        elif ref == (self.asked or "latest"):  # what the source names
            digest, media_type = self.chosen.digest, self.chosen.media_type
        else:  # another name in index.json (a signature's sha256-HEX.sig)
            desc = next((e for e in reversed(self.entries) if (e.annotations or {}).get(_REF_NAME) == ref), None)
            if desc is None:
                raise NotFound("%s has no %s" % (self.name, _printable(ref, 100)))
            digest, media_type = desc.digest, desc.media_type
        fd = self._open_blob(digest)
        with os.fdopen(fd, "rb") as f:
            data = f.read(MAX_MANIFEST_BYTES + 1)
        if len(data) > MAX_MANIFEST_BYTES:
            raise IntegrityError("%s: manifest %s is larger than %d bytes: refused"
                                 % (self.name, digest, MAX_MANIFEST_BYTES))
        _verify_bytes("manifest", data, digest)
        return digest, data, media_type

    def blob(self, desc: Descriptor, offset: int = 0, what: str = "blob") -> Tuple[Any, int]:
        fd = self._open_blob(desc.digest)
        size = os.fstat(fd).st_size
        if size != desc.size:
            os.close(fd)
            raise SizeMismatch(what, desc.digest, desc.size, size, "its file in %s has %%s: refused" % self.name)
        return _FileAnswer(fd, offset), offset

    def small_blob(self, desc: Descriptor, what: str = "blob") -> bytes:
        answer, _ = self.blob(desc, 0, what)
        try:
            data = answer.read1(MAX_MANIFEST_BYTES + 1)
        finally:
            answer.close()
        _verify_bytes(what, data, desc.digest)
        return data

    def referrers(self, digest: str, artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        return None  # a layout has no referrers API: its names (sha256-HEX, .sig) answer instead


class _ArchiveReference(Reference):
    """``docker-archive:FILE[:REF]`` as the store records it."""

    def __str__(self) -> str:
        return "docker-archive:%s%s" % (self.registry[len("docker-archive:"):], ":" + self.tag if self.tag else "")


def parse_archive_source(text: str) -> Tuple[str, Optional[str]]:
    """``docker-archive:FILE[:REF]`` -> (FILE, REF or None), split at the first colon after the prefix."""
    rest = text[len("docker-archive:"):]
    if not text.startswith("docker-archive:") or not rest:
        raise InvalidReference("invalid source %r: expected docker-archive:FILE[:REF]" % _printable(text, 200))
    path, _, ref = rest.partition(":")
    return path, ref or None


class _ArchiveRepository:
    """A ``docker save`` / ``podman save`` tar as a source: its manifest.json names a config and
    layer files (``ID/layer.tar``, or ``blobs/sha256/HEX``; a symlink inside the archive is
    followed within it only). The image is presented as an OCI manifest of those files, each
    hashed first, so every byte is verified again as it is imported, as from a registry."""

    def __init__(self, client: _Client, path: str, wanted: Optional[str]) -> None:
        import tarfile
        self.client, self.path, self.name = client, path, "docker-archive:" + path
        self.lock = threading.Lock()
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO would hang the open, a device act on it
                raise IntegrityError("it is not a regular file: refused")
            self.tar = tarfile.open(path, mode="r:", tarinfo=_layer_tarinfo())  # headers read as a layer's
        except (OSError, tarfile.TarError) as e:
            raise NotFound("%s cannot be read as a tar: %s" % (self.name, getattr(e, "strerror", None) or e)) from None
        except IntegrityError as e:
            raise IntegrityError("%s: %s" % (self.name, str(e).replace("a layer", "the archive"))) from None
        try:
            self.members = dict((_archive_name(m.name), m) for m in self.tar.getmembers())
            self.size = os.fstat(self.fileno()).st_size
        except IntegrityError as e:
            self.tar.close()
            raise IntegrityError("%s: %s" % (self.name, str(e).replace("a layer", "the archive"))) from None
        except (tarfile.TarError, EOFError) as e:  # a member that runs past the end, a broken header
            self.tar.close()
            raise IntegrityError("%s is not a whole tar (truncated?): %s" % (self.name, _printable(e, 200))) from None
        try:
            entries = json.loads(self._bytes("manifest.json", MAX_MANIFEST_BYTES).decode("utf-8"))
        except RecursionError:
            raise IntegrityError("%s: manifest.json is nested too deeply: refused" % self.name) from None
        except (ValueError, UnicodeDecodeError) as e:
            raise IntegrityError("%s: manifest.json is not valid JSON: %s" % (self.name, str(e)[:100])) from None
        if not isinstance(entries, list) or not entries:
            raise IntegrityError("%s: manifest.json lists no image" % self.name)
        if wanted is None and len(entries) > 1:
            tags = sorted(str(t) for e in entries for t in _list_at(_as_dict(e), "RepoTags"))
            raise UsageError("%s holds %d images: name one (%s:REF); it has %s"
                             % (self.name, len(entries), self.name, ", ".join(tags) or "no tags"))
        entry = next((_as_dict(e) for e in entries if wanted is None or wanted in _list_at(_as_dict(e), "RepoTags")
                      or _same_tag(wanted, _list_at(_as_dict(e), "RepoTags"))), None)
        if entry is None:
            raise NotFound("%s has no image %s" % (self.name, _printable(wanted, 100)))
        self.files: Dict[str, str] = {}  # digest -> member name
        config = self._describe(str(entry.get("Config") or ""), MT_OCI_CONFIG)
        layers = [self._describe(str(name), None) for name in _list_at(entry, "Layers")]
        self.document = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_MANIFEST, "config": config,
                                    "layers": layers}, sort_keys=True).encode()
        self.digest = _hash("sha256", self.document)

    def close(self) -> None:
        self.tar.close()

    def _member(self, name: str) -> tarfile.TarInfo:
        """The regular file ``name`` names, following symlinks and hard links inside the archive only."""
        for _ in range(40):
            member = self.members.get(_archive_name(name))
            if member is None:
                raise IntegrityError("%s: %r is not in the archive" % (self.name, _printable(name, 200)))
            if member.isfile() and (member.sparse is not None or member.issparse()):
                # docker save writes none; its holes would come out as any number of zeros,
                # hashed and stored, from a few bytes of archive
                raise IntegrityError("%s: %r is a sparse member: refused" % (self.name, _printable(name, 200)))
            if member.isfile() and member.offset_data + member.size > self.size:
                raise IntegrityError("%s: %r runs past the end of the archive (%d bytes): it is truncated"
                                     % (self.name, _printable(name, 200), self.size))
            if member.isfile():
                return member
            if not (member.issym() or member.islnk()):
                raise IntegrityError("%s: %r is no file" % (self.name, _printable(name, 200)))
            target = member.linkname if member.islnk() else \
                os.path.normpath(os.path.join(os.path.dirname(member.name), member.linkname))
            if target.startswith(("/", "..")):
                raise IntegrityError("%s: %r links out of the archive: refused" % (self.name, _printable(name, 200)))
            name = target
        raise IntegrityError("%s: %r links in a loop" % (self.name, _printable(name, 200)))

    def _bytes(self, name: str, limit: int) -> bytes:
        member = self._member(name)
        if member.size > limit:
            raise IntegrityError("%s: %s is larger than %d bytes: refused" % (self.name, name, limit))
        f = self.tar.extractfile(member)
        assert f is not None
        return f.read()

    def _describe(self, name: str, media_type: Optional[str]) -> Dict[str, Any]:
        member = self._member(name)
        f = self.tar.extractfile(member)
        assert f is not None
        hasher, head = hashlib.sha256(), b""
        for chunk in iter(lambda: f.read(CHUNK), b""):
            head = head or chunk[:4]
            hasher.update(chunk)
        digest = "sha256:" + hasher.hexdigest()
        self.files[digest] = member.name
        if media_type is None:
            media_type = "application/vnd.oci.image.layer.v1.tar" + (
                "+gzip" if head[:2] == b"\x1f\x8b" else "+zstd" if head == b"\x28\xb5\x2f\xfd" else "")
        return {"mediaType": media_type, "digest": digest, "size": member.size}

    def manifest(self, ref: str, *, accept: str = MANIFEST_ACCEPT, what: str = "",
                 head_first: Optional[Callable[[str], Optional[bytes]]] = None) -> Tuple[str, bytes, str]:
        if ref.startswith(tuple(a + ":" for a in _DIGEST_HEX)) and ref != self.digest:
            raise NotFound("%s has no manifest %s" % (self.name, ref))
        return self.digest, self.document, MT_OCI_MANIFEST

    def fileno(self) -> int:
        f: Any = self.tar.fileobj  # the archive, as tarfile.open opened it
        return f.fileno()

    def blob(self, desc: Descriptor, offset: int = 0, what: str = "blob") -> Tuple[Any, int]:
        name = self.files.get(desc.digest)
        if name is None:
            raise NotFound("%s has no %s %s" % (self.name, what, desc.digest))
        member = self._member(name)
        if member.offset_data + member.size > os.fstat(self.fileno()).st_size:  # shrunk since it was opened
            raise SizeMismatch(what, desc.digest, desc.size, "less", "%s has %%s: refused" % self.name)
        if member.isreg() and member.sparse is None and hasattr(os, "pread"):
            # Read at its own offset: parallel downloads share the archive, not a file position
            # (tarfile's file objects seek the one file the TarFile holds, then read it).
            start = member.offset_data + offset
            return _TarAnswer(_ArchivedFile(self.fileno(), start, member.size - offset)), offset
        with self.lock:
            f = self.tar.extractfile(member)
            assert f is not None
            f.seek(offset)
        return _TarAnswer(_Locked(f, self.lock)), offset

    def small_blob(self, desc: Descriptor, what: str = "blob") -> bytes:
        answer, _ = self.blob(desc, 0, what)
        data = answer.read1(MAX_MANIFEST_BYTES + 1)
        _verify_bytes(what, data, desc.digest)
        return data

    def referrers(self, digest: str, artifact_type: Optional[str] = None) -> Optional[List[Descriptor]]:
        return []


def _same_tag(wanted: str, tags: List[Any]) -> bool:
    """Does ``wanted`` (as typed: alpine:3.20) name one of the archive's RepoTags (docker's short names)?"""
    try:
        ref = parse_reference(wanted)
    except PullError:
        return False
    for tag in tags:
        try:
            if isinstance(tag, str) and str(parse_reference(tag)) == str(ref):
                return True
        except PullError:
            continue
    return False


def _archive_name(name: str) -> str:
    """A member name as the archive means it: normalised, without a leading ./ (names that climb
    out of the archive keep their .. and so match nothing)."""
    name = posixpath.normpath(name)
    return name[2:] if name.startswith("./") else name


class _ArchivedFile:
    """A plain member's bytes, read with pread from the archive's descriptor."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self.fd, self.pos, self.end = fd, start, start + max(0, size)

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data  # short where the archive is: the download's size check says so

    def close(self) -> None:
        pass


class _Locked:
    """Any other member's file object (a sparse one): its reads one at a time."""

    def __init__(self, f: Any, lock: threading.Lock) -> None:
        self.f, self.lock = f, lock

    def read(self, n: int = -1) -> bytes:
        with self.lock:
            return self.f.read(n)

    def close(self) -> None:
        with self.lock:
            self.f.close()


class _TarAnswer:
    """A layer inside an archive, answering as a registry's blob response does."""

    def __init__(self, f: Any) -> None:
        self.f, self.status, self.host = f, 200, "(a docker archive)"

    def read1(self, n: int) -> bytes:
        return self.f.read(n)

    def header(self, name: str, default: str = "") -> str:
        return default

    def close(self) -> None:
        self.f.close()


# --------------------------------------------------------------------------- Manifests


def _loads_json(data: bytes, what: str) -> dict:
    try:
        doc = json.loads(data.decode("utf-8"))
    except RecursionError:  # CPython's decoder guards its recursion: hostile nesting ends here
        raise IntegrityError("%s is nested too deeply: refused" % what) from None
    except ValueError as e:
        raise IntegrityError("%s is not valid JSON: %s" % (what, str(e)[:100])) from None
    if not isinstance(doc, dict):
        raise IntegrityError("%s is not a JSON object" % what)
    return doc


def _dict_at(doc: dict, key: str) -> dict:
    """``doc[key]`` when it is an object, else an empty one (documents from servers: any shape)."""
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _as_dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _list_at(doc: dict, key: str) -> list:
    """``doc[key]`` when it is a list, else an empty one."""
    value = doc.get(key)
    return value if isinstance(value, list) else []


class Descriptor(_Record):
    media_type: str
    digest: str
    size: int
    platform: Optional[Platform] = None
    annotations: Optional[dict] = None
    artifact_type: Optional[str] = None

    @classmethod
    def parse(cls, obj: Any, what: str) -> Descriptor:
        if not isinstance(obj, dict):
            raise IntegrityError("%s is not a descriptor object" % what)
        mt, digest, size = obj.get("mediaType"), obj.get("digest"), obj.get("size")
        if not isinstance(mt, str):
            raise IntegrityError("%s has no mediaType" % what)
        check_digest(digest, what + " digest")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise IntegrityError("%s has an invalid size %r" % (what, size))
        plat = None
        p = obj.get("platform")
        if isinstance(p, dict):
            feats = _list_at(p, "os.features")
            plat = Platform(str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant") or ""),
                            str(p.get("os.version") or ""), tuple(str(f) for f in feats))
        ann = obj.get("annotations") if isinstance(obj.get("annotations"), dict) else None
        kind = obj.get("artifactType") if isinstance(obj.get("artifactType"), str) else None
        return cls(mt, str(digest), size, plat, ann, kind)


def _media_type(content_type: str, doc: dict) -> str:
    mt = (content_type or "").split(";")[0].strip().lower()
    declared = doc.get("mediaType")
    if mt in INDEX_TYPES + MANIFEST_TYPES + MT_DOCKER_SCHEMA1:
        # The document's own mediaType, when it has one, must agree (OCI image-spec: manifest).
        if isinstance(declared, str) and declared and declared != mt and mt not in MT_DOCKER_SCHEMA1:
            raise IntegrityError("the registry served a %s whose mediaType says %s" % (mt, declared[:100]))
        return mt
    if isinstance(declared, str) and declared:
        return declared
    if doc.get("schemaVersion") == 1:
        return MT_DOCKER_SCHEMA1[0]
    if "manifests" in doc:
        return MT_OCI_INDEX
    if "layers" in doc and "config" in doc:
        return MT_OCI_MANIFEST
    return mt


def _hash(algo: str, data: bytes) -> str:
    return "%s:%s" % (algo, hashlib.new(algo, data).hexdigest())


def _verify_bytes(what: str, data: bytes, digest: str) -> None:
    algo, _ = check_digest(digest)
    actual = _hash(algo, data)
    if actual != digest:
        raise DigestMismatch(what, digest, actual)


def select_platform(index: List[Descriptor], want: Platform, reference: str) -> Descriptor:
    """The index entry this platform runs best, as containerd and `docker pull` choose.

    Both sides are normalised once; candidates are ranked by _platform_vector (an exact match
    first, then what the host can also run, the closest first; ties keep the index order);
    attestation manifests are never candidates; an entry without a platform is taken only
    when nothing with a platform matches.
    """
    return _choose_platform(index, want, reference)[0]


def _choose_platform(index: List[Descriptor], want: Platform, reference: str) -> Tuple[Descriptor, str]:
    """select_platform, and why: "exact", "compatible (...)" or "no platform given"."""
    want = want.normalized()
    vector = _platform_vector(want.architecture, want.variant)
    best: Optional[Tuple[int, int, Descriptor]] = None
    unplatformed: Optional[Descriptor] = None
    available = []
    for i, d in enumerate(index):
        if d.annotations and d.annotations.get(_ANNOTATION_REF_TYPE) == "attestation-manifest":
            continue
        if d.platform is None:
            unplatformed = unplatformed or d
            continue
        if d.platform.os in ("", "unknown") or d.platform.architecture in ("", "unknown"):
            continue
        available.append(str(d.platform))
        p = d.platform.normalized()
        if p.os != want.os or not _os_version_matches(want.os_version, p.os_version):
            continue
        if (p.architecture, p.variant) in vector:
            rank = vector.index((p.architecture, p.variant))
            if best is None or rank < best[0]:
                best = (rank, i, d)
    if best is not None:
        chosen, how = best[2], "exact" if best[0] == 0 else "compatible (%s runs on %s)" % (best[2].platform, want)
    elif unplatformed is not None:
        chosen, how = unplatformed, "no platform given"
    else:
        raise NoMatchingPlatform(reference, str(want), sorted(set(available)))
    if chosen.media_type not in MANIFEST_TYPES + INDEX_TYPES:
        raise UnsupportedError("%s: the %s entry has media type %s" % (reference, want, chosen.media_type))
    return chosen, how


def _runs_on(have: Platform, want: Platform) -> bool:
    """Can a host of platform ``want`` run an image whose config says ``have``?"""
    have, want = have.normalized(), want.normalized()
    return have.os == want.os and (have.architecture, have.variant) in \
        _platform_vector(want.architecture, want.variant)


def _config_platform(config: dict, want: Platform) -> Platform:
    """The platform an image config says it is for (its os defaulting to the one wanted)."""
    feats = _list_at(config, "os.features")
    return Platform(str(config.get("os") or want.os), str(config.get("architecture") or ""),
                    str(config.get("variant") or ""), str(config.get("os.version") or ""),
                    tuple(str(f) for f in feats))


class Manifest(_Record):
    """A parsed, validated index or manifest (of an image, or of any other OCI content)."""

    media_type: str
    doc: dict
    manifests: Tuple[Descriptor, ...] = ()  # an index's entries
    config: Optional[Descriptor] = None
    layers: Tuple[Descriptor, ...] = ()
    artifact_type: Optional[str] = None  # for an artifact: its artifactType, else its config's media type
    subject: Optional[Descriptor] = None  # what it refers to (a signature, an SBOM of an image)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    @property
    def is_image(self) -> bool:
        """A runnable image: an image config and layers that are tar changesets."""
        return not self.is_index and self.artifact_type is None


def parse_manifest(data: bytes, content_type: str = "", what: str = "manifest") -> Manifest:
    """Parse untrusted manifest bytes; raise IntegrityError/UnsupportedError for anything off."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise IntegrityError("%s is larger than %d bytes: refused" % (what, MAX_MANIFEST_BYTES))
    doc = _loads_json(data, what)
    mt = _media_type(content_type, doc)
    if mt in MT_DOCKER_SCHEMA1:
        raise UnsupportedError(
            "%s is a Docker schema 1 manifest, retired since 2019 and not supported; "
            "push the image again with a current client" % what
        )
    subject = Descriptor.parse(doc["subject"], "subject") if doc.get("subject") is not None else None
    kind = doc.get("artifactType") if isinstance(doc.get("artifactType"), str) and doc.get("artifactType") else None
    if mt in INDEX_TYPES:
        entries = doc.get("manifests")
        if not isinstance(entries, list):
            raise IntegrityError("%s is an index without a manifests list" % what)
        return Manifest(mt, doc, manifests=tuple(Descriptor.parse(e, "index entry") for e in entries),
                        artifact_type=kind, subject=subject)
    if mt not in MANIFEST_TYPES:
        raise UnsupportedError("%s has unsupported media type %r" % (what, mt[:100]))
    if not isinstance(doc.get("layers"), list):
        raise IntegrityError("%s has no layers list" % what)
    config = Descriptor.parse(doc.get("config"), "config")
    layers = tuple(Descriptor.parse(x, "layer %d" % i) for i, x in enumerate(doc["layers"]))
    # Anything else than an image config with tar layers is an artifact (a Helm chart, an SBOM,
    # a signature): content like any other, pulled and verified, never extracted.
    if kind is None and (config.media_type not in (MT_OCI_CONFIG, MT_DOCKER_CONFIG)
                         or any(layer.media_type not in LAYER_TYPES for layer in layers)):
        kind = config.media_type
    sizes: Dict[str, int] = {}
    for d in (config,) + layers:
        if sizes.setdefault(d.digest, d.size) != d.size:
            raise IntegrityError("%s gives blob %s two sizes (%d and %d)" % (what, d.digest, sizes[d.digest], d.size))
    return Manifest(mt, doc, config=config, layers=layers, artifact_type=kind, subject=subject)


# --------------------------------------------------------------------------- Store

# Version 2: an image is a (reference, platform) pair, so two platforms of one tag are two
# images; a manifest may list the same layer twice (one manifest_layers row per position).
# Version 3: the hosts table.
# Version 4: manifests.artifact_type (anything that is not a runnable image), the referrers table.
_SCHEMA_VERSION = 5
_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reference TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    last_used_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    manifest_digest TEXT,
    index_digest TEXT,
    platform TEXT,
    UNIQUE(reference, platform)
);
CREATE TABLE IF NOT EXISTS indexes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    schema_version INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    platform_os TEXT,
    platform_arch TEXT,
    platform_variant TEXT,
    annotations_json TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    digest TEXT
);
CREATE TABLE IF NOT EXISTS manifests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    index_id INTEGER REFERENCES indexes(id) ON DELETE CASCADE,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    schema_version INTEGER NOT NULL,
    media_type TEXT NOT NULL,
    annotations_json TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    digest TEXT,
    artifact_type TEXT
);
CREATE TABLE IF NOT EXISTS configs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest_id INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    media_type TEXT NOT NULL,
    created DATETIME,
    architecture TEXT,
    os TEXT,
    os_variant TEXT,
    config_env_json TEXT,
    config_cmd_json TEXT,
    config_working_dir TEXT,
    config_entrypoint_json TEXT,
    config_volumes_json TEXT,
    config_exposed_ports_json TEXT,
    config_user TEXT,
    rootfs_type TEXT,
    rootfs_diff_ids_json TEXT,
    history_json TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    digest TEXT
);
CREATE TABLE IF NOT EXISTS layers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    media_type TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    diff_id TEXT,
    size_bytes INTEGER NOT NULL,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP
);
CREATE TABLE IF NOT EXISTS manifest_layers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    manifest_id INTEGER NOT NULL REFERENCES manifests(id) ON DELETE CASCADE,
    layer_id INTEGER NOT NULL REFERENCES layers(id) ON DELETE CASCADE,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    position INTEGER,
    UNIQUE(manifest_id, position)
);
-- What was pulled with an image because it refers to it (--referrers: signatures, SBOMs).
CREATE TABLE IF NOT EXISTS referrers (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
    subject TEXT NOT NULL,
    digest TEXT NOT NULL,
    media_type TEXT NOT NULL,
    artifact_type TEXT,
    tag TEXT,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP
);
-- What a registry host speaks (never a secret): the next process sends its credentials, or
-- fetches its token, before the first request instead of after a 401.
CREATE TABLE IF NOT EXISTS hosts (
    host TEXT PRIMARY KEY,
    scheme TEXT NOT NULL,
    challenge TEXT,
    realm TEXT,
    service TEXT,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP
);
CREATE INDEX IF NOT EXISTS idx_indexes_image_id ON indexes(image_id);
CREATE INDEX IF NOT EXISTS idx_manifests_image_id ON manifests(image_id);
CREATE INDEX IF NOT EXISTS idx_configs_manifest_id ON configs(manifest_id);
CREATE INDEX IF NOT EXISTS idx_manifest_layers_manifest_id ON manifest_layers(manifest_id);
CREATE INDEX IF NOT EXISTS idx_manifest_layers_layer_id ON manifest_layers(layer_id);
"""


_NETWORK_FS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "sshfs", "afs", "ceph", "glusterfs", "lustre", "gpfs")


_FS_TYPES: Dict[str, str] = {}


def _fs_type(path: str) -> str:
    """The file system type of ``path`` from /proc/self/mounts (Linux), or "" (read once a path)."""
    if path not in _FS_TYPES:
        _FS_TYPES[path] = _read_fs_type(path)
    return _FS_TYPES[path]


def _read_fs_type(path: str) -> str:
    best, kind = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mount = fields[1].replace("\\040", " ")
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def _mkstemp(directory: str, **kw: Any) -> Tuple[int, str]:
    """mkstemp, but the file follows the umask as open() would (mkstemp makes it 0600)."""
    fd, tmp = tempfile.mkstemp(dir=directory, **kw)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except (OSError, AttributeError):
        pass
    return fd, tmp


def default_home() -> str:
    """The store when none is given: $REGISTRY_PULL_HOME, else ${XDG_DATA_HOME:-~/.local/share}/registry_pull."""
    if os.environ.get("REGISTRY_PULL_HOME"):
        return os.environ["REGISTRY_PULL_HOME"]
    data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(data, "registry_pull")


class _Store:
    """``HOME/blobs/ALGO/HEX`` (content-addressed, shared by all images) + ``HOME/oci.db``."""

    def __init__(self, home: str, writable: bool = True) -> None:
        """``writable=False``: only read an existing store (inspect): nothing is made or written."""
        self.home = os.path.abspath(home)
        self.writable = writable
        self.kept: Optional[Dict[int, Any]] = None  # thread id -> its reading connection, once keep_open()
        self.kept_lock = threading.Lock()
        self.added = 0  # documents put() wrote (a pull that added nothing leaves index.json as it is)
        if not writable:
            return
        try:
            for algo in _DIGEST_HEX:
                os.makedirs(os.path.join(self.home, "blobs", algo), exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=os.path.join(self.home, "blobs", "sha256"),
                                                prefix=".probe-", delete=True)
            probe.close()
        except OSError as e:
            raise StorageError("cannot write to the store %s: %s" % (self.home, e.strerror or e)) from None

    def path(self, digest: str) -> str:
        algo, hexpart = check_digest(digest)
        return os.path.join(self.home, "blobs", algo, hexpart)

    def has(self, digest: str, size: Optional[int] = None) -> bool:
        try:
            st = os.lstat(self.path(digest))
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            raise StorageError("%s is not a regular file: refused (only its owner may write a store, see README)"
                               % self.path(digest))
        return size is None or st.st_size == size

    def read(self, digest: str, limit: int = MAX_MANIFEST_BYTES) -> Optional[bytes]:
        """The bytes of a small blob (a manifest, an index, a config), or None when absent or too
        large. Opened without following a link and without waiting (a FIFO planted under a
        digest's name must not hang a pull); anything but a regular file is StorageError."""
        try:
            fd = os.open(self.path(digest), os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StorageError("cannot read %s: %s" % (self.path(digest), e.strerror or e)) from None
        try:
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise StorageError("%s is not a regular file: refused (only its owner may write a store, "
                                       "see README)" % self.path(digest))
                data = f.read(limit + 1)
        except OSError as e:
            raise StorageError("cannot read %s: %s" % (self.path(digest), e.strerror or e)) from None
        return data if len(data) <= limit else None

    def put(self, digest: str, data: bytes) -> None:
        """Store verified small bytes (manifest, index) atomically under their digest (a
        read-only store keeps nothing)."""
        _verify_bytes("blob", data, digest)
        if not self.writable:
            return
        final = self.path(digest)
        if os.path.exists(final):
            return
        fd, tmp = _mkstemp(os.path.dirname(final), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as e:
            _unlink(tmp)
            raise StorageError("cannot write %s: %s" % (final, e.strerror or e)) from None
        self.added += 1

    # -- metadata ---------------------------------------------------------------------

    def keep_open(self) -> None:
        """Keep each thread's connection for the one-statement queries until close() (a session's
        store): opening one costs more than most of the queries a pull asks."""
        self.kept = {}

    def close(self) -> None:
        with self.kept_lock:
            conns, self.kept = list((self.kept or {}).values()), None
        for conn in conns:
            conn.close()

    def connect(self, kept: bool = False):
        try:
            import sqlite3
        except ImportError:
            return None
        try:
            if not self.writable:
                uri = "file:%s?mode=ro" % urllib.parse.quote(os.path.join(self.home, "oci.db"))
                return sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, check_same_thread=not kept)
            conn = sqlite3.connect(os.path.join(self.home, "oci.db"), timeout=60, isolation_level=None,
                                   check_same_thread=not kept)
            conn.execute("PRAGMA busy_timeout = 60000")
            conn.execute("PRAGMA foreign_keys = ON")
            fs = _fs_type(self.home)
            if fs.split(".")[-1] in _NETWORK_FS or fs in _NETWORK_FS:
                log.info("the store is on %s: SQLite's WAL needs shared memory that network file systems "
                         "lack, so a rollback journal is used", fs)
            else:
                try:
                    conn.execute("PRAGMA journal_mode = WAL")
                except sqlite3.OperationalError:
                    pass
            self._migrate(conn)
        except sqlite3.Error as e:
            raise StorageError("cannot open %s: %s" % (os.path.join(self.home, "oci.db"), e)) from None
        return conn

    @staticmethod
    def _migrate(conn):
        """Create the schema, or upgrade an older store in place (one transaction)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version >= _SCHEMA_VERSION:
            return
        statements = [s for s in ("\n".join(ln for ln in stmt.splitlines() if not ln.strip().startswith("--")).strip()
                                  for stmt in _SCHEMA.split(";")) if s]
        conn.execute("PRAGMA foreign_keys = OFF")  # a table rebuilt below must not cascade its rows away
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version < 1:
                for stmt in statements:
                    conn.execute(stmt)
            elif version < 2:
                # SQLite cannot change a UNIQUE constraint: rebuild the two tables (sqlite.org/lang_altertable).
                for table in ("images", "manifest_layers"):
                    create = next(s for s in statements if s.startswith("CREATE TABLE IF NOT EXISTS %s " % table))
                    conn.execute(create.replace("IF NOT EXISTS %s " % table, "%s_v2 " % table, 1))
                    conn.execute("INSERT INTO %s_v2 SELECT * FROM %s" % (table, table))
                    conn.execute("DROP TABLE %s" % table)
                    conn.execute("ALTER TABLE %s_v2 RENAME TO %s" % (table, table))
                for stmt in statements:
                    if stmt.startswith("CREATE INDEX"):
                        conn.execute(stmt)
            if 1 <= version < 4:
                conn.execute("ALTER TABLE manifests ADD COLUMN artifact_type TEXT")
                conn.execute(next(s for s in statements if s.startswith("CREATE TABLE IF NOT EXISTS referrers ")))
            if 1 <= version < 3:
                conn.execute(next(s for s in statements if s.startswith("CREATE TABLE IF NOT EXISTS hosts ")))
            if 2 <= version < 5:  # (below 2 every index was made above)
                conn.execute(next(s for s in statements if "idx_manifest_layers_layer_id" in s))
            conn.execute("PRAGMA user_version = %d" % _SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            conn.execute("PRAGMA foreign_keys = ON")

    @staticmethod
    def _layers_of(conn, where: str, args: Tuple[Any, ...]) -> List[int]:
        """The layer row ids the images ``WHERE`` selects use (to drop those left unused after)."""
        return [r[0] for r in conn.execute(
            "SELECT DISTINCT ml.layer_id FROM manifest_layers ml JOIN manifests m ON m.id = ml.manifest_id"
            " JOIN images i ON i.id = m.image_id WHERE " + where, args)]

    @staticmethod
    def _drop_unused_layers(conn, ids: Optional[List[int]] = None) -> None:
        """Delete the layers rows (of ``ids``, or all) that no manifest uses any more."""
        unused = "NOT EXISTS (SELECT 1 FROM manifest_layers ml WHERE ml.layer_id = layers.id)"
        if ids is None:
            conn.execute("DELETE FROM layers WHERE " + unused)
        for i in range(0, len(ids or []), 500):
            part = (ids or [])[i:i + 500]
            conn.execute("DELETE FROM layers WHERE id IN (%s) AND %s" % (",".join("?" * len(part)), unused), part)

    def record(self, result: PullResult, index_doc: Optional[dict], manifest_doc: dict, config_doc: dict) -> bool:
        """Write the image's rows in one transaction; False when sqlite3 is unavailable."""
        conn = self.connect()
        if conn is None:
            return False
        import sqlite3

        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        dumps = lambda v: None if v is None else json.dumps(v, sort_keys=True)  # noqa: E731
        cfg = _dict_at(config_doc, "config")
        rootfs = _dict_at(config_doc, "rootfs")
        diff_ids = _list_at(rootfs, "diff_ids")
        plat = result.platform
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                replaced = self._layers_of(conn, "i.reference = ? AND i.platform = ?", (result.reference, str(plat)))
                conn.execute("DELETE FROM images WHERE reference = ? AND platform = ?",
                             (result.reference, str(plat)))
                image_id = conn.execute(
                    "INSERT INTO images (reference, size_bytes, last_used_at, created_at, modified_at,"
                    " manifest_digest, index_digest, platform) VALUES (?,?,?,?,?,?,?,?)",
                    (result.reference, result.size, now, now, now, result.manifest_digest,
                     result.index_digest, str(plat)),
                ).lastrowid
                index_id = None
                if index_doc is not None:
                    index_id = conn.execute(
                        "INSERT INTO indexes (image_id, schema_version, media_type, platform_os, platform_arch,"
                        " platform_variant, annotations_json, created_at, modified_at, digest)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?)",
                        (image_id, int(index_doc.get("schemaVersion") or 2), result.index_media_type,
                         plat.os, plat.architecture, plat.variant or None,
                         dumps(index_doc.get("annotations")), now, now, result.index_digest),
                    ).lastrowid
                manifest_id = conn.execute(
                    "INSERT INTO manifests (index_id, image_id, schema_version, media_type, annotations_json,"
                    " created_at, modified_at, digest, artifact_type) VALUES (?,?,?,?,?,?,?,?,?)",
                    (index_id, image_id, int(manifest_doc.get("schemaVersion") or 2), result.manifest_media_type,
                     dumps(manifest_doc.get("annotations")), now, now, result.manifest_digest, result.artifact_type),
                ).lastrowid
                conn.execute(
                    "INSERT INTO configs (manifest_id, media_type, created, architecture, os, os_variant,"
                    " config_env_json, config_cmd_json, config_working_dir, config_entrypoint_json,"
                    " config_volumes_json, config_exposed_ports_json, config_user, rootfs_type,"
                    " rootfs_diff_ids_json, history_json, created_at, modified_at, digest)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (manifest_id, result.config.media_type, _str_or_none(config_doc.get("created")),
                     _str_or_none(config_doc.get("architecture")), _str_or_none(config_doc.get("os")),
                     _str_or_none(config_doc.get("variant")), dumps(cfg.get("Env")), dumps(cfg.get("Cmd")),
                     _str_or_none(cfg.get("WorkingDir")), dumps(cfg.get("Entrypoint")),
                     dumps(cfg.get("Volumes")), dumps(cfg.get("ExposedPorts")), _str_or_none(cfg.get("User")),
                     _str_or_none(rootfs.get("type")), dumps(diff_ids), dumps(config_doc.get("history")),
                     now, now, result.config.digest),
                )
                for pos, layer in enumerate(result.layers):
                    diff_id = diff_ids[pos] if pos < len(diff_ids) and isinstance(diff_ids[pos], str) else None
                    conn.execute(
                        "INSERT OR IGNORE INTO layers (media_type, digest, diff_id, size_bytes, created_at,"
                        " modified_at) VALUES (?,?,?,?,?,?)",
                        (layer.media_type, layer.digest, diff_id, layer.size, now, now),
                    )
                    layer_id = conn.execute("SELECT id FROM layers WHERE digest = ?", (layer.digest,)).fetchone()[0]
                    conn.execute(
                        "INSERT INTO manifest_layers (manifest_id, layer_id, created_at, modified_at,"
                        " position) VALUES (?,?,?,?,?)",
                        (manifest_id, layer_id, now, now, pos),
                    )
                self._drop_unused_layers(conn, replaced)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself on some errors (disk full, I/O)
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StorageError("cannot record the image in %s: %s" % (os.path.join(self.home, "oci.db"), e)) from None
        finally:
            conn.close()
        return True

    def _thread_connection(self) -> Tuple[Any, bool]:
        """(a connection or None without sqlite3, whether it is kept: not to be closed)."""
        me, conn, keep = threading.get_ident(), None, False
        with self.kept_lock:
            if self.kept is not None:
                conn, keep = self.kept.get(me), True
        if conn is None:
            conn = self.connect(kept=keep)
            if conn is None:
                return None, False
            with self.kept_lock:
                if self.kept is not None and keep:
                    self.kept[me] = conn
                else:  # not kept, or closed meanwhile
                    keep = False
        return conn, keep

    def _query(self, sql, args, write=False):
        """One statement, on this thread's kept connection (keep_open) or one of its own; None
        without sqlite3 (or for an unreadable db when only reading: what it would say is an
        optimisation)."""
        if not write and not os.path.exists(os.path.join(self.home, "oci.db")):
            return None  # a fresh store: nothing to say, and no database made just to say so
        conn, keep = self._thread_connection()
        if conn is None:
            return None
        import sqlite3

        try:
            with conn:
                return conn.execute(sql, args).fetchall()
        except sqlite3.Error as e:
            if write:
                raise StorageError("cannot update %s: %s" % (os.path.join(self.home, "oci.db"), e)) from None
            return None
        finally:
            if not keep:
                conn.close()

    @contextlib.contextmanager
    def _locked(self, shared, cancel=None):
        fd = os.open(os.path.join(self.home, "blobs"), os.O_RDONLY)
        try:
            _flock(fd, "the store %s" % self.home, cancel, shared=shared)
            yield self
        finally:
            os.close(fd)  # releases the lock

    def shared(self, cancel=None):
        """Held by a pull from its first request until its image is recorded and written out:
        collect_garbage() (which holds it exclusively) never deletes a blob a pull is about to use."""
        return self._locked(True, cancel)

    def exclusive(self):
        return self._locked(False)

    def recorded(self, reference: str) -> Optional[str]:
        """The document a tag (REGISTRY/PATH:TAG) was last recorded as: its index, if it named one,
        else its manifest (the most recently used of the platforms pulled); or a referrer pulled
        under that tag with an image of the same repository (a cosign signature)."""
        rows = self._query("SELECT COALESCE(index_digest, manifest_digest) FROM images WHERE reference = ?"
                           " ORDER BY last_used_at DESC, id DESC LIMIT 1", (reference,))
        if rows:
            return rows[0][0]
        name, _, tag = reference.rpartition(":")
        rows = self._query("SELECT r.digest, i.reference FROM referrers r JOIN images i ON i.id = r.image_id"
                           " WHERE r.tag = ?", (tag,)) or []
        return next((d for d, owner in rows if owner.startswith((name + ":", name + "@"))), None)

    def knows(self, reference: str) -> bool:
        """Has an image of this reference been pulled (so a HEAD could confirm it is current)?"""
        return bool(self._query("SELECT 1 FROM images WHERE reference = ? LIMIT 1", (reference,)))

    def host(self, host: str) -> Optional[Tuple[str, Optional[str], Optional[str], Optional[str]]]:
        """(scheme, challenge kind, realm, service) remembered for a registry host."""
        rows = self._query("SELECT scheme, challenge, realm, service FROM hosts WHERE host = ?", (host,))
        return (rows[0][0], rows[0][1], rows[0][2], rows[0][3]) if rows else None

    def remember_host(self, host: str, scheme: str, challenge: Optional[Tuple[str, Dict[str, str]]]) -> None:
        kind, params = challenge if challenge else (None, {})
        if self.host(host) == (scheme, kind, params.get("realm"), params.get("service")):
            return  # as remembered: no write (a commit is the dearest thing a warm re-pull does)
        self._query("INSERT OR REPLACE INTO hosts (host, scheme, challenge, realm, service, modified_at)"
                    " VALUES (?,?,?,?,?,?)", (host, scheme, kind, params.get("realm"), params.get("service"),
                                              time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())), write=True)

    def touch(self, reference: str, manifest_digest: str) -> bool:
        """Mark an unchanged image used now; False when it has no row for this manifest."""
        conn, keep = self._thread_connection()
        if conn is None:
            return False
        import sqlite3

        try:
            with conn:
                cur = conn.execute(
                    "UPDATE images SET last_used_at = ? WHERE reference = ? AND manifest_digest = ?",
                    (time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), reference, manifest_digest),
                )
                return cur.rowcount == 1
        except sqlite3.Error as e:
            raise StorageError("cannot update %s: %s" % (os.path.join(self.home, "oci.db"), e)) from None
        finally:
            if not keep:
                conn.close()

    def images(self) -> List[dict]:
        """One dict per recorded image, by reference and platform."""
        rows = self._query("SELECT reference, platform, manifest_digest, index_digest, size_bytes, created_at,"
                           " last_used_at FROM images ORDER BY reference, platform", ())
        keys = ("reference", "platform", "manifest_digest", "index_digest", "size", "pulled_at", "last_used_at")
        return [dict(zip(keys, row)) for row in rows or []]

    def forget(self, reference: str, platform: Optional[Platform] = None) -> int:
        """Delete the rows of ``reference`` (every platform, or ``platform``'s) and rewrite
        index.json; returns how many images went."""
        where: str = "reference = ?"
        args: List[Any] = [reference]
        if platform is not None:
            rows = self._query("SELECT id, platform FROM images WHERE reference = ?", (reference,)) or []
            ids = [i for i, p in rows if _recorded_platform(p).normalized() == platform.normalized()]
            if not ids:
                return 0
            where, args = "id IN (%s)" % ",".join("?" * len(ids)), ids
        with self.exclusive():
            conn = self.connect()
            if conn is None:
                raise UnsupportedError("this Python has no sqlite3 module: the store has no image list")
            try:
                with conn:
                    used = self._layers_of(conn, "i." + where, tuple(args))
                    n = conn.execute("DELETE FROM images WHERE " + where, args).rowcount
                    self._drop_unused_layers(conn, used)
            finally:
                conn.close()
            if n:
                self.write_index(reference)
        return n

    def drop_unused_rows(self) -> None:
        """Delete the layers rows no image uses (versions before 0.3 left them behind)."""
        conn = self.connect()
        if conn is None:
            return
        try:
            with conn:
                self._drop_unused_layers(conn)
        finally:
            conn.close()

    def record_referrers(self, reference: str, platform: str, found: List[Tuple[str, Descriptor]]) -> None:
        """Rows for what was pulled with an image because it refers to it: kept while it is."""
        now = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        conn = self.connect()
        if conn is None:
            return
        try:
            with conn:
                row = conn.execute("SELECT id FROM images WHERE reference = ? AND platform = ?",
                                   (reference, platform)).fetchone()
                if row is None:
                    return
                conn.execute("DELETE FROM referrers WHERE image_id = ?", (row[0],))
                for subject, d in found:
                    conn.execute("INSERT INTO referrers (image_id, subject, digest, media_type, artifact_type, tag,"
                                 " created_at) VALUES (?,?,?,?,?,?,?)",
                                 (row[0], subject, d.digest, d.media_type, d.artifact_type,
                                  (d.annotations or {}).get(_REF_NAME), now))
        except Exception as e:
            raise StorageError("cannot record the referrers in %s: %s" % (os.path.join(self.home, "oci.db"), e)) \
                from None
        finally:
            conn.close()

    def referrer_rows(self, reference: str) -> List[Tuple[str, str, str, Optional[str], Optional[str]]]:
        """(subject, digest, media type, artifact type, tag) of what was pulled with ``reference``."""
        rows = self._query("SELECT r.subject, r.digest, r.media_type, r.artifact_type, r.tag FROM referrers r"
                           " JOIN images i ON i.id = r.image_id WHERE i.reference = ? ORDER BY r.id", (reference,))
        return [(r[0], r[1], r[2], r[3], r[4]) for r in rows or []]

    def referenced(self) -> Dict[str, List[str]]:
        """digest -> the references of the images that need it (manifests, indexes, configs,
        layers, and what an image's index lists beside it: attestations and their blobs)."""
        rows = self._query(
            "SELECT i.reference, i.manifest_digest, i.index_digest, c.digest, l.digest FROM images i"
            " LEFT JOIN manifests m ON m.image_id = i.id LEFT JOIN configs c ON c.manifest_id = m.id"
            " LEFT JOIN manifest_layers ml ON ml.manifest_id = m.id LEFT JOIN layers l ON l.id = ml.layer_id", ())
        refs: Dict[str, List[str]] = {}
        seen: Set[Tuple[str, str]] = set()  # (digest, reference) pairs already in refs: no list scans

        def need(digest: Optional[str], reference: str) -> None:
            if digest and (digest, reference) not in seen:
                seen.add((digest, reference))
                refs.setdefault(digest, []).append(reference)

        listed: Dict[str, List[str]] = {}  # each index is read once, however many rows name it
        for row in rows or []:
            if row[2] and row[2] not in listed:
                listed[row[2]] = self._listed(row[2])
            for digest in list(row[1:]) + (listed[row[2]] if row[2] else []):
                need(digest, row[0])
        # What an image's referrers (signatures, SBOMs) need belongs to the image too.
        blobs_of: Dict[str, List[str]] = {}
        for reference, digest in self._query("SELECT i.reference, r.digest FROM referrers r"
                                             " JOIN images i ON i.id = r.image_id", ()) or []:
            if digest not in blobs_of:
                blobs_of[digest] = self._blobs_of(digest)
            for d in [digest] + blobs_of[digest]:
                need(d, reference)
        return refs

    def _blobs_of(self, digest: str) -> List[str]:
        """The config and layer digests of a manifest in the store (none if it is absent or no manifest)."""
        try:
            data = self.read(digest)
            doc = _loads_json(data, "manifest") if data else {}
        except PullError:
            return []
        parts = [doc.get("config")] + _list_at(doc, "layers")
        return [d["digest"] for d in parts if isinstance(d, dict) and isinstance(d.get("digest"), str)]

    def _listed(self, index_digest: Optional[str]) -> List[str]:
        """Digests of the manifests an index in the store lists, and of their blobs, where stored."""
        out: List[str] = []
        try:
            data = self.read(index_digest) if index_digest else None
            entries = _loads_json(data, "index").get("manifests") if data else None
            for entry in entries if isinstance(entries, list) else []:
                digest = entry.get("digest") if isinstance(entry, dict) else None
                sub = self.read(digest) if isinstance(digest, str) else None
                if sub is None:
                    continue
                doc = _loads_json(sub, "manifest")
                out.append(str(digest))
                layers = doc.get("layers")
                for d in [doc.get("config")] + (layers if isinstance(layers, list) else []):
                    if isinstance(d, dict) and isinstance(d.get("digest"), str):
                        out.append(d["digest"])
        except PullError:
            pass  # a blob that is not what it should be: verify() is the place to say so
        return out

    @contextlib.contextmanager
    def blob_files(self) -> Any:
        """Yields [(digest or "", name, descriptor of its directory)] for every entry under
        HOME/blobs ("" for .partial files and temporaries). The directories are opened without
        following links (a ``blobs/sha256`` that is a symbolic link is refused), so what the
        caller removes is always inside the store, by name relative to that descriptor."""
        fds: List[int] = []
        try:
            try:
                blobs = _open_dir(os.path.join(self.home, "blobs"))
                fds.append(blobs)
                for algo in _DIGEST_HEX:
                    fds.append(_open_dir(algo, blobs, create=True))
            except OSError as e:
                raise StorageError("cannot open %s/blobs (%s): a store's directories must be its own, not links"
                                   % (self.home, e.strerror or e)) from None
            out = []
            for algo, fd in zip(_DIGEST_HEX, fds[1:]):
                for name in sorted(os.listdir(fd)):
                    full = "%s:%s" % (algo, name)
                    out.append((full if re.fullmatch(r"[0-9a-f]{%d}" % _DIGEST_HEX[algo], name) else "", name, fd))
            yield out
        finally:
            for fd in fds:
                os.close(fd)

    _compact = staticmethod(json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode)
    _INDEX_HEAD = '{"manifests":[\n'
    _INDEX_TAIL = '\n],"mediaType":"%s","schemaVersion":2}\n' % MT_OCI_INDEX
    _ENTRY_HEAD = '{"annotations":{"org.opencontainers.image.ref.name":'  # _REF_NAME, first in sorted keys

    def write_index(self, reference: Optional[str] = None) -> None:
        """Write HOME/index.json from the database: the store is an OCI image layout of every
        image, one compact entry a line in the order of their names. With ``reference``, only
        that name's lines change (the others are kept as the file has them, so a pull into a
        store of thousands costs what it costs in an empty one); without it, or when the file is
        not as this writes it, every line is made again, leaving out each image whose manifest
        is gone (removed by hand)."""
        conn, keep = self._thread_connection()
        if conn is None:
            return
        try:
            top = _open_dir(self.home)
        except OSError as e:
            if not keep:
                conn.close()
            raise StorageError("cannot open the store %s: %s" % (self.home, e.strerror or e)) from None
        blobs: Dict[str, int] = {}
        try:
            with _DirLock(top, self.home):
                kept = self._index_lines(top) if reference is not None else None
                sql = ("SELECT i.reference, i.manifest_digest, m.media_type, i.platform FROM images i "
                       "JOIN manifests m ON m.image_id = i.id")
                parts: Optional[List[bytes]] = None
                if kept is not None and reference is not None:
                    rows = conn.execute(sql + " WHERE i.reference = ? ORDER BY i.platform", (reference,)).fetchall()
                    parts = self._splice(kept, reference, self._lines_of(top, blobs, rows))
                if parts is None:  # from scratch
                    parts = self._lines_of(top, blobs, conn.execute(sql + " ORDER BY i.reference").fetchall())
                if not _is_regular_at(top, "oci-layout"):
                    _write_atomic(top, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
                _write_atomic(top, "index.json", (self._INDEX_HEAD.encode() + b",\n".join(parts)
                                                  + self._INDEX_TAIL.encode() if parts else
                                                  (self._INDEX_HEAD[:-1] + self._INDEX_TAIL[1:]).encode()))
        except OSError as e:
            raise StorageError("cannot write %s: %s" % (os.path.join(self.home, "index.json"), e.strerror or e)) \
                from None
        finally:
            for fd in blobs.values():
                os.close(fd)
            os.close(top)
            if not keep:
                conn.close()

    def _lines_of(self, top: int, blobs: Dict[str, int], rows: List[Any]) -> List[bytes]:
        made = [self._index_line(top, blobs, *row) for row in rows]
        return [line.encode() for line in made if line is not None]

    def _index_lines(self, top: int) -> Optional[bytes]:
        """index.json's entry lines (as the file has them, between its head and tail), or None
        when it is absent or not as write_index writes it."""
        try:
            fd = os.open("index.json", os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC, dir_fd=top)
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > MAX_MANIFEST_BYTES * 64:
                    return None
                data = f.read(size + 1)  # (one more: a file that grew is read whole, not cut)
        except OSError:
            return None
        head, tail = self._INDEX_HEAD.encode(), self._INDEX_TAIL.encode()
        if not (data.startswith(head) and data.endswith(tail)) or len(data) < len(head) + len(tail):
            return None
        return data[len(head):len(data) - len(tail)]

    def _line_name(self, line: bytes) -> str:
        """The image name an entry line of index.json is for ("" if it cannot be read)."""
        try:
            name, _ = json.JSONDecoder().raw_decode(line.decode("utf-8"), len(self._ENTRY_HEAD))
        except ValueError:  # (UnicodeDecodeError included)
            return ""
        return name if isinstance(name, str) else ""

    def _splice(self, body: bytes, reference: str, lines: List[bytes]) -> Optional[List[bytes]]:
        """``body``'s lines with ``reference``'s replaced by ``lines`` (in name order), as pieces
        to join with ",\\n"; None when a line it reads is not one compact entry (a file edited by
        hand: rebuilt whole). The lines are found by a binary search on byte offsets, so only a
        dozen of a store of thousands are read, and the rest is copied as it is."""
        entry = self._ENTRY_HEAD.encode()

        def line_at(pos: int) -> Tuple[int, int]:  # (start, end) of the line holding offset pos
            start = body.rfind(b",\n", 0, pos)
            start = 0 if start < 0 else start + 2
            end = body.find(b",\n", start)
            end = len(body) if end < 0 else end
            # One entry a line: compact JSON has no newline inside, so a line that starts as an
            # entry and ends its object is a whole entry, and a cut beside it cuts no entry.
            if not (body.startswith(entry, start, end) and body.endswith(b"}", start, end)):
                raise ValueError("not an entry line")
            return start, end
        try:
            lo, hi = 0, len(body) + 2  # line starts; len(body) + 2 stands for the end
            while lo < hi:  # after the lines of names up to ``reference`` (bisect_right)
                start, end = line_at((lo + hi) // 2)
                if reference < self._line_name(body[start:end]):
                    hi = start
                else:
                    lo = end + 2
            at = cut = lo  # the old lines of this name are the ones just before
            prefix = (self._ENTRY_HEAD + json.dumps(reference) + "},").encode()
            while cut > 0:
                start, end = line_at(cut - 2)
                if not body.startswith(prefix, start, end):
                    break
                cut = start
            if at < len(body):
                line_at(at)  # the line after the cut is an entry too
        except ValueError:
            return None
        before = [body[:cut - 2]] if cut > 0 else []
        after = [body[at:]] if at < len(body) else []
        return before + lines + after

    def _index_line(self, top: int, blobs: Dict[str, int], reference: str, digest: str, media_type: str,
                    plat: Optional[str]) -> Optional[str]:
        """One image's entry line, or None when its manifest is not in the store."""
        algo, _, hexpart = (digest or "").partition(":")
        if len(hexpart) != _DIGEST_HEX.get(algo) or not (hexpart.isascii() and hexpart.isalnum()):
            return None
        try:
            if algo not in blobs:
                blobs[algo] = os.open(os.path.join("blobs", algo), _O_DIR, dir_fd=top)
            size = os.stat(hexpart, dir_fd=blobs[algo], follow_symlinks=False).st_size
        except OSError:
            return None  # a blob removed by hand: leave the image out rather than lie
        return self._compact(_layout_entry(media_type, digest, size, _recorded_platform(plat), reference))


def _str_or_none(v):
    return v if isinstance(v, str) else None


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


_fcntl: Any
try:
    import fcntl as _fcntl
except ImportError:  # Windows: no advisory locks; concurrent processes may download twice
    _fcntl = None


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)  # no /proc: the classic dance (another thread may create a file meanwhile)
    os.umask(old)
    return old


def _lock_holder(fd: int) -> str:
    """Who holds the flock on ``fd``'s file, from /proc/locks (Linux), as words for a message."""
    try:
        st = os.fstat(fd)
        inode = ":%d " % st.st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and (fields[5] + " ").endswith(inode) \
                        and fields[4] != str(os.getpid()):
                    return "another registry_pull (pid %s)" % fields[4]
    except (OSError, ValueError):
        pass
    return "another registry_pull"


def _flock(fd: int, what: str, cancel: Optional[_Cancel] = None, shared: bool = False) -> None:
    """A flock on ``fd`` (exclusive, or ``shared``); says so after a second of waiting, and
    keeps waiting (as long as ``cancel`` allows: Ctrl-C and --timeout still end it)."""
    if _fcntl is None:
        return
    said = False
    started = time.monotonic()
    while True:
        try:
            _fcntl.flock(fd, (_fcntl.LOCK_SH if shared else _fcntl.LOCK_EX) | _fcntl.LOCK_NB)
            return
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
        if not said and time.monotonic() - started >= 1.0:
            log.warning("waiting for %s on %s", _lock_holder(fd), what)
            said = True
        if cancel is not None:
            cancel.wait(0.1)
        else:
            time.sleep(0.1)


def _unlocked(dir_fd: int, name: str) -> bool:
    """Does no process hold the flock of ``name`` in ``dir_fd`` (a download in progress)?"""
    if _fcntl is None:
        return True
    try:
        fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    except OSError:
        return False
    try:
        _fcntl.flock(fd, _fcntl.LOCK_EX | _fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- Downloads


_PARTIAL = threading.Event()  # some download has written into a .partial file (the Ctrl-C line says so)


FLUSH_BYTES = 32 * 1024 * 1024  # a blob's bytes written between two early write-backs


class _EarlyFlush:
    """The disk works while bytes arrive: every FLUSH_BYTES written, an fdatasync on a helper
    thread (one at a time; the download goes on meanwhile), so that the fsync before the rename
    finds little left to write. One 1 GB layer used to wait 1.4-2 s for it after its last byte."""

    def __init__(self, fd: int) -> None:
        self.fd, self.unsynced = fd, 0
        self.thread: Optional[threading.Thread] = None

    def wrote(self, n: int) -> None:
        self.unsynced += n
        if self.unsynced >= FLUSH_BYTES and (self.thread is None or not self.thread.is_alive()):
            self.unsynced = 0
            self.thread = threading.Thread(target=self._sync, name="registry_pull-flush", daemon=True)
            self.thread.start()

    def _sync(self) -> None:
        try:
            getattr(os, "fdatasync", os.fsync)(self.fd)
        except OSError:
            pass  # the fsync before the rename says what matters

    def finish(self) -> None:
        """Wait for the write-back under way (before the fsync, and before the descriptor closes)."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None


class _Downloader:
    """Fetches blobs into the store: resumable, locked against other processes, verified."""

    def __init__(self, repo: _Repository, store: _Store,
                 progress: Optional[Callable[[str, int, int], None]] = None) -> None:
        self.repo, self.store, self.progress = repo, store, progress
        self.cancel = repo.client.cancel
        self.fetched_bytes = 0
        self._count_lock = threading.Lock()

    def fetch(self, desc: Descriptor, what: str = "layer") -> str:
        """Make sure ``desc`` is in the store; return its path."""
        final = self.store.path(desc.digest)
        partial = final + ".partial"
        while True:
            if self.store.has(desc.digest):
                if self.store.has(desc.digest, desc.size):
                    self._report(desc, desc.size)
                    return final
                # A short (or long) final blob: a power loss after a rename that the data had not
                # reached the disk before (older versions did not fsync). Fetch it again.
                log.warning("%s in the store has the wrong size for %s; fetching it again", final, desc.digest)
                _unlink(final)
            try:
                fd = os.open(partial, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
                             | getattr(os, "O_CLOEXEC", 0), 0o644)
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise StorageError("%s is a symbolic link: refused (only its owner may write a store, "
                                       "see README)" % partial) from None
                raise StorageError("cannot create %s: %s" % (partial, e.strerror or e)) from None
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise StorageError("%s is not a regular file: refused (only its owner may write a store, "
                                   "see README)" % partial)
            _flock(fd, partial, self.cancel)  # another process downloading it: wait for it
            try:
                same = os.stat(partial).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # it finished (renamed) while we waited: look again
                os.close(fd)
                continue
            if self.store.has(desc.digest, desc.size):
                _unlink(partial)
                os.close(fd)
                continue
            break
        f = os.fdopen(fd, "r+b", buffering=0)
        flush = _EarlyFlush(f.fileno())
        try:
            self._download(desc, f, what, flush)
            flush.finish()
            os.fsync(f.fileno())  # the bytes are on disk before the name says the blob is complete
            os.replace(partial, final)
        except IntegrityError:
            _unlink(partial)  # wrong bytes are not worth resuming
            raise
        except OSError as e:
            raise StorageError("cannot write %s: %s" % (partial, e.strerror or e)) from None
        finally:
            flush.finish()
            f.close()  # closing releases the lock
        return final

    def _report(self, desc, done):
        if self.progress is not None:
            self.progress(desc.digest, done, desc.size)

    def _download(self, desc, f, what, flush=None):
        algo, _ = check_digest(desc.digest)
        size = desc.size
        integrity_tries = 0
        while True:
            hasher, have = self._resume_state(f, algo, size)
            self._report(desc, have)  # a download begins (a blob already present reports only its end)
            try:
                if have == size:  # complete already (killed before the rename): verify it, no request
                    self._verify(desc, hasher, what)
                else:
                    self._stream(desc, f, hasher, have, what, flush)
            except IntegrityError:
                f.seek(0)
                f.truncate(0)
                integrity_tries += 1
                if integrity_tries > 1:
                    raise
                log.info("%s %s failed verification; downloading it again", what, desc.digest)
                continue
            return

    @staticmethod
    def _verify(desc, hasher, what):
        actual = "%s:%s" % (hasher.name, hasher.hexdigest())
        if actual != desc.digest:
            raise DigestMismatch(what, desc.digest, actual)

    @staticmethod
    def _resume_state(f, algo, size):
        """Hash what a previous run left in the .partial, so the download can go on from there."""
        hasher = hashlib.new(algo)
        have = os.fstat(f.fileno()).st_size
        if have > size:
            f.truncate(0)
            have = 0
        f.seek(0)
        left = have
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                break
            hasher.update(chunk)
            left -= len(chunk)
        have -= left
        f.seek(have)
        f.truncate(have)
        return hasher, have

    def _restart(self, f, hasher):
        f.seek(0)
        f.truncate(0)
        return hashlib.new(hasher.name), 0

    def _stream(self, desc, f, hasher, have, what, flush=None):
        size = desc.size
        cancel = self.cancel
        retry = _Retry(cancel, "%s %s" % (what, desc.digest))
        while True:
            resp, start = self.repo.blob(desc, have, what)
            if start < have:  # the registry sends it all again
                hasher, have = self._restart(f, hasher)
            began = have
            try:
                lost: Optional[object] = None
                stall = _Stall()
                while True:
                    cancel.check()
                    want = min(CHUNK, size - have + 1)  # one byte more than promised reveals overlong bodies
                    try:
                        # read1: what has arrived, at once; read/readinto would wait for a full
                        # chunk, and a connection cut would lose what they had buffered.
                        chunk = resp.read1(want)
                    except (OSError, http.client.HTTPException) as e:
                        lost = e
                        break
                    n = len(chunk)
                    if not n:
                        break
                    if have + n > size:
                        raise SizeMismatch(what, desc.digest, size, "more")
                    f.write(chunk)  # OSError here is the disk's: StorageError in fetch()
                    if flush is not None:
                        flush.wrote(n)
                    _PARTIAL.set()
                    hasher.update(chunk)
                    have += n
                    with self._count_lock:
                        self.fetched_bytes += n
                    self._report(desc, have)
                    stalled = stall.check(n) if have < size else None
                    if stalled:
                        lost = stalled
                        break
            finally:
                resp.close()
            if have < size:
                why = lost if isinstance(lost, str) else _reason_text(lost) if lost is not None else "body ended early"
                if have - began >= STALL_BYTES and not isinstance(lost, str):
                    retry.progressed()  # 5 failures in a row, not in all: a cut after progress starts afresh
                retry.again("%s %s: %s at %d of %d bytes; resuming" % (what, desc.digest, why, have, size),
                            timed_out=isinstance(lost, socket.timeout), wait_scale=0.25)
                continue
            break
        self._verify(desc, hasher, what)


def _in_parallel(work: Callable[[Any], None], items: List[Any], jobs: int, cancel: _Cancel,
                 name: str = "registry_pull") -> None:
    """``work(item)`` for every item, in order, on up to ``jobs`` daemon threads; the first real
    failure is raised once the others have seen it (never the Interrupted it caused its siblings to
    raise), and Interrupted if ``cancel`` was set from outside (Ctrl-C, the caller) before every
    item was done. Daemon threads, not a ThreadPoolExecutor: on Ctrl-C the process must exit at
    once, not wait for a read blocked on a stalled server (.partial files stay consistent)."""
    todo: List[Any] = list(items)
    errors: List[BaseException] = []
    todo.reverse()  # popped from the end, in order
    lock = threading.Lock()

    def worker() -> None:
        while not cancel.is_set():
            with lock:
                if not todo:
                    return
                item = todo.pop()
            try:
                work(item)
            except BaseException as e:  # handed to the caller
                with lock:
                    errors.append(e)
                cancel.set()
                return
    threads = [threading.Thread(target=worker, name="%s-%d" % (name, i), daemon=True)
               for i in range(max(1, min(jobs, len(todo))))]
    for t in threads:
        t.start()
    try:
        for t in threads:
            while t.is_alive():
                t.join(0.25)
                cancel.check()  # --timeout, Ctrl-C, or a sibling's failure
        if cancel.is_set():  # set after the last thread had already stopped
            raise Interrupted("interrupted")
    except Interrupted:
        if not errors:  # the caller's cancel or Ctrl-C, not a worker's failure
            raise
        for t in threads:  # let the siblings see it (their reads are bounded by the watchdog)
            t.join(1.0)
    except BaseException:
        cancel.set()
        raise
    if errors:
        real = [e for e in errors if not isinstance(e, Interrupted)]
        raise (real or errors)[0]


# --------------------------------------------------------------------------- Progress


class _Bars:
    """Per-blob progress bars on a terminal (stderr), redrawn at most ten times a second.

    Blobs are learnt from the callbacks as their downloads start; each line shows bytes,
    total and that blob's rate, and a last line the whole pull's.
    """

    def __init__(self, stream):
        self.stream = stream
        self.order: List[str] = []
        self.size: Dict[str, int] = {}
        self.done: Dict[str, int] = {}
        self.began: Dict[str, Tuple[float, float]] = {}  # first callback, latest callback
        self.start = time.monotonic()
        self.lock = threading.Lock()
        self.drawn = 0
        self.last = 0.0

    def __call__(self, digest, done, total):
        with self.lock:
            now = time.monotonic()
            if digest not in self.size:
                self.order.append(digest)
                self.size[digest] = total
                self.began[digest] = (now, now) if done < total else (-1.0, -1.0)  # -1: already present
            self.done[digest] = done
            if self.began[digest][0] >= 0:
                self.began[digest] = (self.began[digest][0], now)
            if now - self.last >= 0.1 or done == total:
                self.last = now
                self._draw(now)

    def _draw(self, now):
        width = max(10, min(30, shutil.get_terminal_size((80, 20)).columns - 62))
        lines = []
        for digest in self.order:
            done, total = self.done[digest], self.size[digest]
            fill = int((done / total if total else 1.0) * width)
            first, latest = self.began[digest]
            rate = "present" if first < 0 else "%s/s" % _human(done / max(latest - first, 1e-3))
            bar = "#" * fill + "." * (width - fill)
            lines.append("%s [%s] %9s / %9s %11s" % (digest.split(":")[1][:12], bar, _human(done), _human(total), rate))
        got = sum(self.done.values())
        lines.append("%s / %s  %s/s" % (_human(got), _human(sum(self.size.values())),
                                        _human(got / max(now - self.start, 1e-3))))
        out = ("\x1b[%dA" % self.drawn if self.drawn else "") + "".join("\r\x1b[K" + ln + "\n" for ln in lines)
        self.drawn = len(lines)
        self.stream.write(out)
        self.stream.flush()


class _Lines:
    """Progress for a log, where stderr is no terminal (a CI job, a file): one line as each blob
    finishes, and a total line (bytes, rate, ETA) at most every PROGRESS_INTERVAL seconds while
    bytes arrive, so a long pull shows life without drawing bars into the log."""

    def __init__(self, stream: Any, interval: Optional[float] = None) -> None:
        self.stream = stream
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self.size: Dict[str, int] = {}
        self.done: Dict[str, int] = {}
        self.began: Dict[str, Tuple[float, int]] = {}  # when and where each download began
        self.finished: Set[str] = set()
        self.start = self.last = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self, digest: str, done: int, total: int) -> None:
        with self.lock:
            now = time.monotonic()
            first = digest not in self.size
            self.size[digest], self.done[digest] = total, done
            if first:
                self.began[digest] = (now, done)
            lines = []
            if done >= total and digest not in self.finished:
                self.finished.add(digest)
                t0, d0 = self.began[digest]
                if first:
                    lines.append("%s %s present" % (digest[:19], _human(total)))
                else:
                    lines.append("%s %s done in %.1fs (%s/s)" % (digest[:19], _human(total), now - t0,
                                                                 _human((done - d0) / max(now - t0, 1e-3))))
            elif now - self.last >= self.interval:
                self.last = now
                lines.append(self._total(now))
            if lines:
                self.stream.write("".join("registry_pull: " + ln + "\n" for ln in lines))
                self.stream.flush()

    def _total(self, now: float) -> str:
        got, total = sum(self.done.values()), sum(self.size.values())
        moved = got - sum(d0 for _, d0 in self.began.values())
        rate = moved / max(now - self.start, 1e-3)
        eta = "ETA %ds" % ((total - got) / rate) if rate > 0 else "ETA unknown"
        return "%s of %s (%d%%), %s/s, %s" % (_human(got), _human(total), 100 * got // max(total, 1), _human(rate), eta)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024.0
    return str(n)


# --------------------------------------------------------------------------- Outputs

_REF_NAME = "org.opencontainers.image.ref.name"


_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _O_NOFOLLOW | _O_CLOEXEC


def _open_dir(name: str, dir_fd: Optional[int] = None, create: bool = False) -> int:
    """A descriptor of directory ``name`` (relative to ``dir_fd``), never through a symbolic
    link; made first (mode 0777 less the umask) when ``create`` and absent."""
    if create:
        try:
            os.mkdir(name, 0o777, dir_fd=dir_fd)
        except FileExistsError:
            pass
    return os.open(name, _O_DIR, dir_fd=dir_fd)


def _tmp_name(prefix: str = ".tmp-") -> str:
    return prefix + os.urandom(8).hex()


def _create_excl(dir_fd: int, prefix: str = ".tmp-", mode: int = 0o666) -> Tuple[int, str]:
    """A new file in ``dir_fd`` under an unpredictable name, created O_EXCL|O_NOFOLLOW (a name
    planted by someone who can write the directory is never opened): (fd, name)."""
    for _ in range(100):
        name = _tmp_name(prefix)
        try:
            return os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, mode,
                           dir_fd=dir_fd), name
        except FileExistsError:
            continue
    raise StorageError("cannot create a temporary file: 100 names taken")


def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    """``name`` in ``dir_fd`` replaced by ``data`` at once (a temporary file, then a rename)."""
    fd, tmp = _create_excl(dir_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_at(dir_fd, tmp)
        raise


def _unlink_at(dir_fd: int, name: str) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _is_regular_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def _same_blob_at(dir_fd: int, name: str, src_path: str, algo: str) -> bool:
    """Is ``name`` in ``dir_fd`` (a layout's blob) the store's file at ``src_path``, or a
    regular file of its bytes? A name proves nothing: a file of other bytes is to be replaced."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    src = os.stat(src_path, follow_symlinks=False)
    if (st.st_dev, st.st_ino) == (src.st_dev, src.st_ino):
        return True
    if not stat.S_ISREG(st.st_mode) or st.st_size != src.st_size:
        return False
    try:
        fd = _open_regular_at(name, dir_fd)
    except (OSError, _NotRegular):
        return False
    try:
        h = hashlib.new(algo)
        while True:
            chunk = os.read(fd, CHUNK)
            if not chunk:
                break
            h.update(chunk)
    finally:
        os.close(fd)
    return h.hexdigest() == name


def _copy_into(src_path: str, dir_fd: int, name: str, link: bool = True) -> None:
    """The file ``src_path`` (the store's) as ``name`` in ``dir_fd``: a hard link where the file
    system allows (and ``link``), else a copy into a new O_EXCL file; renamed into place (a
    planted name is replaced, never written through)."""
    tmp = _tmp_name()
    try:
        if not link:
            raise OSError(errno.EXDEV, "a copy is asked for")
        os.link(src_path, tmp, dst_dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        src = os.open(src_path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
        try:
            fd, tmp = _create_excl(dir_fd)
            try:
                while True:
                    chunk = os.read(src, CHUNK)
                    if not chunk:
                        break
                    while chunk:
                        chunk = chunk[os.write(fd, chunk):]
            finally:
                os.close(fd)
        except BaseException:
            _unlink_at(dir_fd, tmp)
            raise
        finally:
            os.close(src)
    try:
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        _unlink_at(dir_fd, tmp)
        raise


class _NotRegular(Exception):
    pass


def _open_regular_at(name: str, dir_fd: int) -> int:
    """A descriptor of the regular file ``name`` in ``dir_fd`` (read-only, no link followed).
    Anything else is refused before it is opened (opening a device can act: a watchdog arms,
    a tape rewinds; a FIFO blocks), and checked again after (in case it was swapped)."""
    if not stat.S_ISREG(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
        raise _NotRegular(name)
    fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0), dir_fd=dir_fd)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _NotRegular(name)
    return fd


class _DirLock:
    """An exclusive advisory lock on a directory (flock on its descriptor): no lock file."""

    def __init__(self, dir_fd: int, what: str, cancel: Optional[_Cancel] = None) -> None:
        self.dir_fd, self.what, self.cancel = dir_fd, what, cancel

    def __enter__(self) -> "_DirLock":
        self.fd = os.open(".", _O_DIR, dir_fd=self.dir_fd)
        try:
            _flock(self.fd, self.what, self.cancel)  # (Ctrl-C and --timeout end the wait)
        except BaseException:
            os.close(self.fd)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)  # releases the lock


def _layout_entry(media_type: str, digest: str, size: int, platform: Platform, name: str) -> dict:
    plat: Dict[str, Any] = {"os": platform.os, "architecture": platform.architecture}
    if platform.variant:
        plat["variant"] = platform.variant
    if platform.os_version:
        plat["os.version"] = platform.os_version
    if platform.os_features:
        plat["os.features"] = list(platform.os_features)
    return {"mediaType": media_type, "digest": digest, "size": size, "platform": plat,
            "annotations": {_REF_NAME: name}}


def _result_entry(result: PullResult, name: str) -> dict:
    return _layout_entry(result.manifest_media_type, result.manifest_digest, result.manifest_size,
                         result.platform, name)


def _write_layout(dir_fd: int, index: dict) -> None:
    """The oci-layout marker and index.json of a layout, each replaced atomically (lock held)."""
    if not _is_regular_at(dir_fd, "oci-layout"):
        _write_atomic(dir_fd, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
    index.update({"schemaVersion": 2, "mediaType": MT_OCI_INDEX})
    _write_atomic(dir_fd, "index.json", json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")


def _update_layout_index(dir_fd: int, directory: str, entries: List[dict], cancel: Optional[_Cancel] = None) -> None:
    """Add ``entries`` to DIR/index.json, replacing those with the same ref.name; atomic, locked."""
    with _DirLock(dir_fd, directory, cancel):
        path = os.path.join(directory, "index.json")
        try:
            fd = _open_regular_at("index.json", dir_fd)  # (a FIFO there would hang the open)
            with os.fdopen(fd, "rb") as f:
                index = json.loads(f.read(MAX_MANIFEST_BYTES * 16).decode("utf-8"))
            if not isinstance(index, dict) or not isinstance(index.get("manifests", []), list):
                raise ValueError("not an index")
            manifests = [m for m in index.get("manifests", []) if isinstance(m, dict)]
        except FileNotFoundError:
            index, manifests = {}, []
        except (ValueError, OSError, RecursionError, _NotRegular):
            raise StorageError("%s is not a valid OCI index: refusing to overwrite it" % path) from None
        names = set((e.get("annotations") or {}).get(_REF_NAME) for e in entries) - {None}
        unnamed = set(e["digest"] for e in entries if not (e.get("annotations") or {}).get(_REF_NAME))
        manifests = [m for m in manifests if (m.get("annotations") or {}).get(_REF_NAME) not in names
                     and not (m.get("digest") in unnamed and not (m.get("annotations") or {}).get(_REF_NAME))]
        index["manifests"] = manifests + entries
        _write_layout(dir_fd, index)


def _export_blobs(paths: List[str], directory: str, entries: List[dict], cancel: Optional[_Cancel] = None) -> None:
    """Blobs into the OCI layout DIR (hard links where possible) and ``entries`` into its index.
    Below DIR every name is reached through descriptors opened without following links, and
    files are made O_EXCL under unpredictable names: whoever can write DIR's subdirectories
    cannot make this write anywhere else."""
    try:
        os.makedirs(directory, exist_ok=True)
        top = _open_dir(directory)
    except OSError as e:
        raise StorageError("cannot write the OCI layout %s: %s" % (directory, e.strerror or e)) from None
    try:
        blobs = _open_dir("blobs", top, create=True)
        try:
            algos: Dict[str, int] = {}
            for path in paths:
                algo, name = os.path.basename(os.path.dirname(path)), os.path.basename(path)
                check_digest("%s:%s" % (algo, name), "blob")
                if algo not in algos:
                    algos[algo] = _open_dir(algo, blobs, create=True)
                if not _same_blob_at(algos[algo], name, path, algo):
                    _copy_into(path, algos[algo], name)
        finally:
            for fd in algos.values():
                os.close(fd)
            os.close(blobs)
        _update_layout_index(top, directory, entries, cancel)
    except OSError as e:
        raise StorageError("cannot write the OCI layout %s: %s" % (directory, e.strerror or e)) from None
    finally:
        os.close(top)


def _split_layout_arg(text: str, default_name: str) -> Tuple[str, str]:
    """``DIR[:NAME]`` split at the first colon, as skopeo's oci: transport does."""
    directory, sep, name = text.partition(":")
    if not directory:
        raise UsageError("--oci-layout needs a directory: %r" % text)
    name = name if sep else default_name
    if not name or not re.fullmatch(r"[A-Za-z0-9._-]+(?:[:/@+][A-Za-z0-9._-]+)*", name):
        raise UsageError("invalid image name %r for --oci-layout (letters, digits, . _ - : / @ +)" % name)
    return directory, name


def export_oci_layout(result: PullResult, target: str) -> str:
    """Write the pulled image into the OCI layout ``DIR[:NAME]`` (hard links where possible)."""
    return _export_layout(result, target)


def _export_layout(result: PullResult, target: str, cancel: Optional[_Cancel] = None) -> str:
    default = _reference(result.reference).tag or "latest"  # (a local source's NAME too)
    directory, name = _split_layout_arg(target, default)
    _export_blobs(result.blob_paths(), directory, [_result_entry(result, name)], cancel)
    return directory


def _familiar(ref: Reference) -> str:
    """The name `docker save` writes in RepoTags: docker.io/library/ dropped."""
    name = ref.name
    if ref.registry == _DOCKER_HUB:
        name = ref.repository[len("library/"):] if ref.repository.startswith("library/") else ref.repository
    return name


_TITLE = "org.opencontainers.image.title"


def export_files(result: PullResult, directory: str) -> List[str]:
    """Write each layer that has an ``org.opencontainers.image.title`` annotation as a file
    under ``directory`` (made if absent), as ``oras pull`` does; returns the paths written.
    Titles are checked as tar names are (no absolute path, no ``..``, nothing through a link:
    IntegrityError); an existing file is refused (StorageError), and each file appears whole
    or not at all."""
    manifest = parse_manifest(_read_blob(result.manifest_path), result.manifest_media_type, result.reference)
    titled = [(d, (d.annotations or {}).get(_TITLE)) for d in manifest.layers]
    titled = [(d, t) for d, t in titled if isinstance(t, str) and t]
    names = [_clean_name(str(t), result.reference) for _, t in titled]
    if len(set(names)) != len(names) or "" in names:
        raise IntegrityError("%s: the layers' titles name one file twice, or no file" % result.reference)
    try:
        os.makedirs(directory, exist_ok=True)
        top = _open_dir(directory)
    except OSError as e:
        raise StorageError("cannot write into %s: %s" % (directory, e.strerror or e)) from None
    written: List[str] = []
    made: List[Tuple[int, str]] = []  # (a descriptor of its directory, name) of each file written
    try:
        for name in names:  # every name checked before the first file is written: all or nothing
            _check_free(top, name, directory, result.reference)
        for (desc, _), name in zip(titled, names):
            head, _, base = name.rpartition("/")
            fd = _walk_dirs(top, head, result.reference)
            try:
                _copy_new(os.path.join(result.home, "blobs", *desc.digest.split(":")), fd, base)
            except FileExistsError:
                os.close(fd)
                raise StorageError("%s exists: refused (a pulled file never replaces one)"
                                   % os.path.join(directory, name)) from None
            except BaseException:
                os.close(fd)
                raise
            made.append((fd, base))
            written.append(os.path.join(os.path.abspath(directory), name))
        for fd, _ in made:
            os.close(fd)
        made = []
    except OSError as e:
        raise StorageError("cannot write into %s: %s" % (directory, e.strerror or e)) from None
    finally:
        for fd, base in made:  # a later file failed (made meanwhile by someone else): none stays
            _unlink_at(fd, base)
            os.close(fd)
        os.close(top)
    return written


def _check_free(top: int, name: str, directory: str, what: str) -> None:
    """Refuse (StorageError) a title whose file exists below ``top``, or whose directory is a
    file; a link on the way is refused as _walk_dirs refuses it (IntegrityError)."""
    parts = name.split("/")
    fd = os.open(".", _O_DIR, dir_fd=top)
    try:
        for i, part in enumerate(parts):
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return  # nothing there yet: free
            here = os.path.join(directory, *parts[:i + 1])
            if i == len(parts) - 1:
                raise StorageError("%s exists: refused (a pulled file never replaces one)" % here)
            if stat.S_ISLNK(st.st_mode):
                raise IntegrityError("%s: a title leads through %r, which is a link or no directory: refused"
                                     % (what, part[:100]))
            if not stat.S_ISDIR(st.st_mode):
                raise StorageError("%s exists and is no directory: refused (a title needs it to be one)" % here)
            nfd = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def _read_blob(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        return f.read(MAX_MANIFEST_BYTES + 1)


def _walk_dirs(top: int, rel: str, what: str) -> int:
    """A new descriptor of directory ``rel`` below ``top``, made where missing, each component
    opened without following links (a link on the way is hostile: IntegrityError)."""
    fd = os.open(".", _O_DIR, dir_fd=top)
    for part in [p for p in rel.split("/") if p]:
        try:
            try:
                nfd = os.open(part, _O_DIR, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o777, dir_fd=fd)
                nfd = os.open(part, _O_DIR, dir_fd=fd)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise IntegrityError("%s: a title leads through %r, which is a link or no directory: refused"
                                     % (what, part[:100])) from None
            raise
        os.close(fd)
        fd = nfd
    return fd


def _copy_new(src_path: str, dir_fd: int, name: str) -> None:
    """Copy the store's file to a new ``name`` in ``dir_fd``: written under a temporary name,
    then linked into place, which fails (FileExistsError) rather than replace anything."""
    tmp = _tmp_name()
    _copy_into(src_path, dir_fd, tmp, link=False)  # a file of the user's: editing it must not edit the store
    try:
        os.link(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
    finally:
        _unlink_at(dir_fd, tmp)


# -- one flattened tar -------------------------------------------------------------------------


def _dir_meta(info: Any) -> str:
    """What the flattener keeps of a directory entry until it writes it at the end."""
    return json.dumps([info.mode, info.uid, info.gid, info.mtime, info.uname, info.gname,
                       dict((k, v) for k, v in info.pax_headers.items()
                            if k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")))])


class _Flattener:
    """The image's final tree as one tar, streamed from the layers, the top one first: an entry
    is written the first time its name is met (an upper layer's wins), unless an upper layer's
    whiteout, opaque directory or non-directory above it hides it. What was met is kept in an
    sqlite file, so memory does not grow with the entries; hard links to what a lower layer
    holds are written at the end, once their target is."""

    def __init__(self, out: Any) -> None:
        import sqlite3

        self.dir = tempfile.mkdtemp(prefix="registry_pull-tar-")
        self.db = sqlite3.connect(os.path.join(self.dir, "names.db"), isolation_level=None)
        self.db.execute("PRAGMA journal_mode = OFF")
        self.db.execute("PRAGMA synchronous = OFF")
        self.db.execute("PRAGMA cache_size = -2048")  # 2 MiB of pages: the rest is on disk
        self.db.execute("CREATE TABLE seen (name TEXT PRIMARY KEY, isdir INTEGER, layer INTEGER)")
        self.db.execute("CREATE TABLE hidden (name TEXT, children INTEGER, layer INTEGER, PRIMARY KEY (name, layer))")
        self.db.execute("CREATE TABLE links (id INTEGER PRIMARY KEY, name TEXT, target TEXT, meta TEXT, layer INTEGER,"
                        " ahead INTEGER DEFAULT 0)")  # ahead: its target was this layer's already
        self.db.execute("CREATE TABLE dirs (name TEXT PRIMARY KEY, meta TEXT)")
        self.db.execute("CREATE INDEX links_target ON links (target)")
        self.db.execute("BEGIN")
        self.out, self.offset = out, 0  # the tar is written here, as tarfile's PAX format writes one
        self.layer = self.count = 0
        self.open_dirs: Set[str] = set()  # directories of the current layer known visible (fewer queries)
        self.root_hidden = False  # an upper layer's root is opaque
        # Hard links to a lower layer's file whose name an upper layer (or the link's own, later)
        # gave to another file: the links wait for that lower file (by its name) to come by.
        self.capture: Dict[str, List[Any]] = {}
        self.spilled: Dict[str, Any] = {}  # name -> its bytes on disk, or (the name it was written as,)
        # Directories in the tree only as the parents of hidden entries (no layer listed them yet),
        # and this layer's parents of hidden entries already looked at.
        self.implicit: Set[str] = set()
        self.implied: Dict[str, bool] = {}  # -> whether it is a directory of the tree
        self.waiting: Set[str] = set()  # this layer's links not written yet (left for later)

    def close(self) -> None:
        try:
            self.db.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _entry_of(self, name: str) -> Optional[Tuple[int, int]]:
        """(kind: 0 a file or other, 1 a directory, 2 a symbolic link; the layer it is from, 1
        the top) of the entry ``name`` has in the tree, or None."""
        return self.db.execute("SELECT isdir, layer FROM seen WHERE name = ?", (name,)).fetchone()

    def _seen(self, name: str) -> Optional[int]:
        row = self._entry_of(name)
        return None if row is None else row[0]

    def _seen_in(self, name: str) -> Optional[int]:
        """The layer whose entry ``name`` is in the tree (1 the top), or None."""
        row = self._entry_of(name)
        return None if row is None else row[1]

    def _visible(self, name: str) -> bool:
        """Is a lower layer's ``name`` still in the tree the layers above made?"""
        if name and self.root_hidden:
            return False
        parts = name.split("/")
        for i in range(1, len(parts) + 1):
            here, below = "/".join(parts[:i]), i < len(parts)
            if below and here in self.open_dirs:
                continue  # a directory this layer's entries were already found visible below
            # (a row per layer: an upper layer's opaque marker must not mask a lower one's whiteout)
            row = self.db.execute("SELECT MIN(children) FROM hidden WHERE name = ? AND layer < ?",
                                  (here, self.layer)).fetchone()
            if row[0] is not None and (row[0] == 0 or below):
                return False  # whited out (itself or a directory above it), or below an opaque directory
            if below:
                found = self._entry_of(here)
                if found is not None and found[0] == 2 and found[1] == self.layer:
                    raise UnsupportedError("--tar cannot flatten this image yet: a layer writes %s through its "
                                           "own symbolic link %s; --rootfs extracts it" % (name, here))
                if found is not None and found[0] in (0, 2):
                    return False  # an upper layer put a file (or a link) where this has a directory
                # Holds for the rest of this layer: the upper layers' rows are all in, and a
                # name's row never changes (the one change, this layer's own non-directory at
                # ``here``, empties the set: see layer_entries).
                self.open_dirs.add(here)
        if not name:  # the root entry
            return self._seen(".") is None
        return True

    def layer_entries(self, tar: tarfile.TarFile, name: str) -> None:
        """One layer's entries (the layers come top first)."""
        import tarfile
        self.layer += 1
        self.open_dirs = set()
        self.implied = {}
        self.waiting = set()
        # An upper layer's opaque root hides every entry below it but the root's own.
        self.root_hidden = self.db.execute("SELECT 1 FROM hidden WHERE name = '' AND layer < ?",
                                           (self.layer,)).fetchone() is not None
        while True:
            info = tar.next()
            if info is None:
                break
            setattr(tar, "members", [])
            rel = _clean_name(info.name, name)
            head, _, base = rel.rpartition("/")
            if base.startswith(_WHITEOUT):
                if base == _OPAQUE:
                    self.db.execute("INSERT OR IGNORE INTO hidden VALUES (?, 1, ?)", (head, self.layer))
                elif not base.startswith(_WHITEOUT + _WHITEOUT):
                    gone = (head + "/" if head else "") + base[len(_WHITEOUT):]
                    self.db.execute("INSERT OR IGNORE INTO hidden VALUES (?, 0, ?)", (gone, self.layer))
                    # (the name whited out wins over its own opaque marker in the same layer)
                    self.db.execute("UPDATE hidden SET children = 0 WHERE name = ? AND layer = ?", (gone, self.layer))
                continue
            key = rel or "."
            row = self._entry_of(key)
            seen = None if row is None else row[0]
            again = False
            if row is not None and row[1] == self.layer and rel:
                # The same name twice in one layer: the later entry wins, as tar -x (and --rootfs)
                # give it: a directory's metadata replaced, another entry written again over the first.
                if info.isdir() and seen == 1:
                    self.db.execute("UPDATE dirs SET meta = ? WHERE name = ?", (_dir_meta(info), key))
                    self.implicit.discard(key)  # (listed now: a lower file there is replaced by it)
                    continue
                self.db.execute("DELETE FROM links WHERE name = ?", (key,))
                if info.isdir():  # over a file of its layer: written now too (tar -x replaces the file
                    # before what follows below it), and again at the end with the rest
                    self.db.execute("UPDATE seen SET isdir = 1 WHERE name = ?", (key,))
                    self.db.execute("INSERT OR IGNORE INTO hidden VALUES (?, 1, ?)", (key, self.layer))
                    self.db.execute("INSERT INTO dirs VALUES (?, ?)", (key, _dir_meta(info)))
                    info.name = key
                    info.pax_headers = {}
                    self._add(info)
                    continue
                if seen == 1:  # a directory of its layer, now a file or a link: all below it goes
                    self._nothing_written_below(key, rel)
                    self.db.execute("DELETE FROM dirs WHERE name = ?", (key,))
                    self.db.execute("INSERT OR IGNORE INTO hidden VALUES (?, 1, ?)", (key, self.layer))
                    self.implicit.discard(key)
                    self.open_dirs = set()
                again, seen = True, None
            if seen == 1 and key in self.implicit and info.isdir() and self._visible(rel):
                self.implicit.discard(key)  # a directory made only as a parent: a lower layer lists it
                self.db.execute("UPDATE dirs SET meta = ? WHERE name = ?", (_dir_meta(info), key))
                continue
            if not again and (seen is not None or not self._visible(rel)):
                if seen is None and head and head not in self.implied:
                    self._imply_parents(head, info.mtime)
                if seen == 1 and info.issym() and key in self.implicit and self._visible(rel):
                    self._below_lower_symlink(key)  # (not whited out above: still there)
                if seen == 1 and not info.isdir():  # an upper layer's directory over this file or link:
                    # what the layers below put under this name was gone before that directory came
                    self.db.execute("INSERT OR IGNORE INTO hidden VALUES (?, 1, ?)", (key, self.layer))
                if seen is None and (info.isreg() or info.islnk()):
                    self._take_waiting(key)  # upper layers' links to what is hidden now: theirs still
                if info.isreg() and key in self.capture:  # the file upper layers' hard links are
                    self._captured(tar, info, key)
                elif info.islnk() and key in self.capture:  # a link itself: theirs is its target's inode
                    self._pass_on(self.capture.pop(key), _clean_name(info.linkname, name))
                elif info.isreg():  # gone from the tree, but a later hard link of this layer may still be it
                    self._spill(tar, info, key)
                continue
            if head and head not in self.implied:  # parents no layer listed yet: this layer's
                self._imply_parents(head, info.mtime)  # (a lower file of their name is below them)
            self.db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?)",
                            (key, 1 if info.isdir() else 2 if info.issym() else 0, self.layer))
            if key in self.open_dirs and not info.isdir():
                self._nothing_written_below(key, rel)
                self.open_dirs = set()  # what was below it is hidden now (the set holds every prefix it has)
            # The name as the tree has it; of the PAX records only the extended attributes carry on.
            info.name = key
            info.pax_headers = dict((k, v) for k, v in info.pax_headers.items()
                                    if k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")))
            if info.islnk():
                info.linkname = _clean_name(info.linkname, name)
                kept = self.spilled.get(info.linkname)
                if kept is not None:  # its target's name now holds something else: this is the inode's name
                    self._unspill(info, kept)
                    continue
                found = self._entry_of(info.linkname)
                held_by = None if found is None else found[1]
                if found == (1, self.layer):  # (--rootfs refuses it the same way)
                    raise _hostile(name, "hard link %r -> %r points at a directory" % (key[:100], info.linkname[:100]))
                later = held_by == self.layer and info.linkname in self.waiting
                if held_by is None or later:  # its target comes from a lower layer (or is a link that
                    # waits for one): written at the end, after it
                    meta = json.dumps([info.mode, info.uid, info.gid, info.mtime, info.uname, info.gname])
                    self.db.execute("INSERT INTO links (name, target, meta, layer, ahead) VALUES (?, ?, ?, ?, ?)",
                                    (key, info.linkname, meta, self.layer, int(later)))
                    self.waiting.add(key)
                    continue
                if held_by != self.layer:  # an upper layer's file holds the name: this is a lower one's inode
                    self.capture.setdefault(info.linkname, []).append(info)
                    self.waiting.add(key)
                    continue
            if info.isdir():  # written last, after everything below it (tar -x then leaves its time alone)
                self.db.execute("INSERT INTO dirs VALUES (?, ?)", (key, _dir_meta(info)))
            elif info.issym() or info.islnk() or info.ischr() or info.isblk() or info.isfifo():
                self._add(info)
            elif info.sparse is None:  # straight from the stream (tarfile's file object adds two buffers per byte)
                self._add(info, tar.fileobj)
            else:  # a sparse file, its holes as zeros: a plain file (an old GNU 'S' header here would hold no map)
                data = tar.extractfile(info)
                info.type = tarfile.REGTYPE
                self._add(info, data)
            self.count += 1
            if self.count % 10000 == 0:  # a transaction's dirty pages stay in memory until it ends
                self.db.execute("COMMIT")
                self.db.execute("BEGIN")
        for kept in self.spilled.values():
            if isinstance(kept, str):
                _unlink(kept)
        self.spilled = {}
        # This layer's links left for the end whose target it then replaced itself: they wait
        # for the lower file instead (the name at the end is another file).
        for lid, lname, target, meta in self.db.execute(
                "SELECT l.id, l.name, l.target, l.meta FROM links l JOIN seen s ON s.name = l.target"
                " WHERE l.layer = ? AND s.layer = ? AND l.ahead = 0", (self.layer, self.layer)).fetchall():
            self.db.execute("DELETE FROM links WHERE id = ?", (lid,))
            link = tarfile.TarInfo(lname)
            link.type, link.linkname = tarfile.LNKTYPE, target
            link.mode, link.uid, link.gid, link.mtime, link.uname, link.gname = json.loads(meta)
            self.capture.setdefault(target, []).append(link)

    def _below_lower_symlink(self, key: str) -> None:
        """An upper layer wrote below ``key`` without listing it as a directory, and this lower
        layer has a symbolic link there: --rootfs writes through it, --tar cannot (a lower file
        there is hidden by the upper layer's directory instead, which --rootfs refuses)."""
        below = self.db.execute("SELECT name FROM seen WHERE name > ? AND name < ? ORDER BY name LIMIT 1",
                                (key + "/", key + "0")).fetchone()
        raise UnsupportedError("--tar cannot flatten this image yet: a layer writes %s through the symbolic "
                               "link %s of a lower one; --rootfs extracts it"
                               % (below[0] if below is not None else key + "/...", key))

    def _nothing_written_below(self, key: str, rel: str) -> None:
        """A layer replaces ``key`` (a directory it wrote below) by a file or a link: what it put
        there is in the tar already, and tar -x cannot then make the file (UnsupportedError)."""
        below = self.db.execute("SELECT name FROM seen WHERE name > ? AND name < ? AND layer = ? LIMIT 1",
                                (key + "/", key + "0", self.layer)).fetchone()
        if below is not None:
            raise UnsupportedError("--tar cannot flatten this image yet: a layer puts %s below %s, then makes %s "
                                   "a file or a link; --rootfs extracts it" % (below[0], rel, rel))

    def _imply_parents(self, head: str, mtime: float) -> None:
        """The directories above an entry that no layer listed so far: its layer made them, and
        they stay (as in --rootfs) even when the entry is hidden (whited out itself, or below an
        opaque directory), 0755 and root's unless a lower layer lists them, with the entry's time
        (the same tar every time); a lower layer's file or link of their name is below them."""
        parts = head.split("/")
        for i in range(1, len(parts) + 1):
            here = "/".join(parts[:i])
            if here in self.implied:
                if self.implied[here]:
                    continue
                return
            seen = self._seen(here)
            if seen is None:
                if not self._visible(here):
                    self.implied[here] = False  # (hidden: so is all below it)
                    return
                self.db.execute("INSERT INTO seen VALUES (?, 1, ?)", (here, self.layer))
                self.db.execute("INSERT INTO dirs VALUES (?, ?)", (here, json.dumps(
                    [0o755, 0, 0, mtime, "", "", {}])))
                self.implicit.add(here)
            elif seen != 1:
                self.implied[here] = False
                return
            self.implied[here] = True

    def _captured(self, tar: tarfile.TarFile, info: tarfile.TarInfo, key: str) -> None:
        """The lower file ``key`` that upper layers' hard links name: the first link becomes the
        file (its bytes from here), the others links to it, as are this layer's later links."""
        import tarfile
        links = self.capture.pop(key)
        first = links[0]
        first.type, first.linkname, first.size = tarfile.REGTYPE, "", info.size
        # The inode's metadata is the file's (as --rootfs links to it), not the link entry's.
        first.mode, first.uid, first.gid, first.mtime = info.mode, info.uid, info.gid, info.mtime
        first.uname, first.gname = info.uname, info.gname
        first.pax_headers = dict((k, v) for k, v in info.pax_headers.items()
                                 if k.startswith(("SCHILY.xattr.", "LIBARCHIVE.xattr.")))
        if info.sparse is None:
            self._add(first, tar.fileobj)
        else:
            self._add(first, tar.extractfile(info))
        for link in links[1:]:
            link.linkname = first.name
            self._add(link)
        self.spilled[key] = (first.name,)

    def _take_waiting(self, key: str) -> None:
        """The links of upper layers left for the end whose target ``key`` is hidden (whited out,
        or below an opaque directory): they wait on this entry instead (the inode they name)."""
        import tarfile
        rows = self.db.execute("SELECT id, name, meta FROM links WHERE target = ? ORDER BY id", (key,)).fetchall()
        if not rows:
            return
        links = []
        for lid, lname, meta in rows:
            link = tarfile.TarInfo(lname)
            link.type, link.linkname = tarfile.LNKTYPE, key
            link.mode, link.uid, link.gid, link.mtime, link.uname, link.gname = json.loads(meta)
            links.append(link)
        self.db.execute("DELETE FROM links WHERE target = ?", (key,))
        self.capture.setdefault(key, [])[:0] = links

    def _pass_on(self, links: List[Any], target: str) -> None:
        """Upper layers' hard links to a name whose lower entry is a hard link to ``target``
        (this layer's): they are links to what ``target`` is here, now or once it comes by."""
        import tarfile
        kept = self.spilled.get(target)
        if isinstance(kept, tuple):  # that inode was already written, under another name
            target = kept[0]
        elif kept is not None:  # the bytes of a file of this layer whose name an upper layer took
            first = links[0]
            first.type, first.linkname, first.size = tarfile.REGTYPE, "", os.path.getsize(kept)
            with open(kept, "rb") as f:
                self._add(first, f)
            _unlink(kept)
            self.spilled[target] = (first.name,)
            links, target = links[1:], first.name
        elif self._seen_in(target) != self.layer:  # a lower layer's (or an upper layer holds the name)
            self.capture.setdefault(target, []).extend(links)
            return
        for link in links:
            link.linkname = target
            self._add(link)

    def _add(self, info: tarfile.TarInfo, data: Any = None) -> None:
        """``info`` (and ``data``, a file object, for a file) into the tar, as tarfile's addfile
        writes it: a plain ustar header made here in one go when nothing needs a PAX record
        (tarfile builds it field by field: half of the time of a tar of small files), else
        tarfile's own; the bytes straight to the output (tarfile's stream slices every write into
        10 KiB records, copying what is left each time: quadratic in a big file's chunks)."""
        import tarfile
        head = _ustar_header(info) or info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
        out = self.out
        out.write(head)
        written = len(head)
        if data is not None:
            read = getattr(data, "read1", None) or data.read  # no join of a chunk's tail and the next's head
            left = info.size
            while left:
                chunk = read(min(CHUNK, left))
                if not chunk:
                    raise tarfile.ReadError("unexpected end of data")
                out.write(chunk)
                left -= len(chunk)
            pad = -info.size % tarfile.BLOCKSIZE
            out.write(b"\0" * pad)
            written += info.size + pad
        self.offset += written

    def _spill(self, tar: tarfile.TarFile, info: tarfile.TarInfo, key: str) -> None:
        """Keep a skipped file's bytes until the layer ends (on disk, not in memory)."""
        fd, path = tempfile.mkstemp(dir=self.dir)
        with os.fdopen(fd, "wb") as f:
            src = tar.extractfile(info)
            assert src is not None
            shutil.copyfileobj(src, f, CHUNK)
        self.spilled[key] = path

    def _unspill(self, link: tarfile.TarInfo, kept: Any) -> None:
        """A hard link to a file an upper layer replaced: the first becomes the file (that inode's
        only name left), the others links to it."""
        import tarfile
        if isinstance(kept, tuple):  # already written under the first link's name
            link.linkname = kept[0]
            self._add(link)
            return
        link.type, link.size = tarfile.REGTYPE, os.path.getsize(kept)
        with open(kept, "rb") as f:
            self._add(link, f)
        _unlink(kept)
        self.spilled[link.linkname] = (link.name,)

    def _write_links(self, pending: Dict[str, Any]) -> None:
        """Write the links left for the end, each after the link it names when that is one of
        them too (tar -x links to what is already there). A link whose chain ends at no file
        (nothing of that name in the tree, a directory, or a ring of links) is refused: its
        inode is one an upper layer hid or replaced in a way --tar cannot carry (or none at all,
        which --rootfs refuses as hostile)."""
        done: Set[str] = set()
        for name in pending:
            chain: List[str] = []
            on_chain: Set[str] = set()
            end = name
            while end in pending and end not in done and end not in on_chain:
                chain.append(end)
                on_chain.add(end)
                end = pending[end].linkname
            if end in on_chain or (end not in done and self._seen(end) in (None, 1)):
                raise UnsupportedError("--tar cannot flatten this image yet: hard link %s -> %s names no file of "
                                       "the tree (one an upper layer hid or replaced, or none); --rootfs extracts "
                                       "it or says what is wrong" % (name, pending[name].linkname))
            for link in reversed(chain):
                self._add(pending[link])
                done.add(link)

    def finish(self) -> None:
        """The hard links left for the end, where their target was written; then the tar's end.
        A layer that wrote below a lower layer's symbolic link (through it, in --rootfs) cannot be
        flattened name by name: UnsupportedError rather than a tar whose tree differs."""
        import tarfile
        # CROSS JOIN: the links outside, a range of the name index inside (left to itself the
        # planner scans every name and indexes the links for each: 1.5 s of a 13,000-entry image).
        through = self.db.execute("SELECT a.name, b.name FROM seen a CROSS JOIN seen b ON b.name > a.name || '/'"
                                  " AND b.name < a.name || '0' WHERE a.isdir = 2 AND b.layer < a.layer"
                                  " LIMIT 1").fetchone()
        if through is not None:
            raise UnsupportedError("--tar cannot flatten this image yet: a layer writes %s through the symbolic "
                                   "link %s of a lower one; --rootfs extracts it" % (through[1], through[0]))
        pending: Dict[str, Any] = {}  # the links left for the end, by name, in the order met
        for name, target, meta in self.db.execute("SELECT name, target, meta FROM links ORDER BY id").fetchall():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.LNKTYPE, target
            info.mode, info.uid, info.gid, info.mtime, info.uname, info.gname = json.loads(meta)
            pending[name] = info
        for target, links in sorted(self.capture.items()):  # no lower file of that name came by
            for link in links:
                log.info("hard link %s: no lower layer has the file %s it was made to; linked to the one there is",
                         link.name, target)
                pending[link.name] = link
        self.capture = {}
        self._write_links(pending)
        for name, meta in self.db.execute("SELECT name, meta FROM dirs ORDER BY name").fetchall():
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode, info.uid, info.gid, info.mtime, info.uname, info.gname, info.pax_headers = json.loads(meta)
            self._add(info)
        # The end, as tarfile ends an archive: two zero blocks, then zeros to a whole record.
        self.out.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self.offset += 2 * tarfile.BLOCKSIZE
        self.out.write(b"\0" * (-self.offset % tarfile.RECORDSIZE))


_USTAR = None  # the struct of a ustar header (made with the first)


def _ustar_header(info: Any) -> Optional[bytes]:
    """The 512-byte ustar header tarfile's PAX format writes for ``info`` when it needs no PAX
    record (ASCII names that fit, whole numbers in range, no extended attributes), or None."""
    global _USTAR
    import struct
    import tarfile
    name = info.name + "/" if info.type == tarfile.DIRTYPE and not info.name.endswith("/") else info.name
    numbers = (info.uid, info.gid, info.size, info.mtime)
    if info.pax_headers or info.mode is None or not all(type(n) is int for n in numbers) \
            or not (0 <= info.uid < 8 ** 7 and 0 <= info.gid < 8 ** 7 and 0 <= info.size < 8 ** 11
                    and 0 <= info.mtime < 8 ** 11):
        return None
    if not isinstance(info.type, bytes) or len(info.type) != 1:
        return None
    device = info.type in (tarfile.CHRTYPE, tarfile.BLKTYPE)
    if device and not (0 <= info.devmajor < 8 ** 7 and 0 <= info.devminor < 8 ** 7):
        return None
    try:
        texts = [t.encode("ascii") for t in (name, info.linkname, info.uname, info.gname)]
    except (UnicodeEncodeError, AttributeError):
        return None
    if len(texts[0]) > 100 or len(texts[1]) > 100 or len(texts[2]) > 32 or len(texts[3]) > 32:
        return None
    if _USTAR is None:
        _USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s32s32s8s8s155s12x")
    buf = bytearray(_USTAR.pack(
        texts[0], b"%07o\0" % (info.mode & 0o7777), b"%07o\0" % info.uid, b"%07o\0" % info.gid,
        b"%011o\0" % info.size, b"%011o\0" % info.mtime, b"        ", info.type, texts[1], tarfile.POSIX_MAGIC,
        texts[2], texts[3], b"%07o\0" % info.devmajor if device else b"", b"%07o\0" % info.devminor if device else b"",
        b""))
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf)


def export_tar(result: PullResult, target: Any) -> str:
    """The image's final tree as one tar (``--tar``), as ``docker export`` / ``crane export``
    give it: whiteouts and opaque directories applied, hard links kept as links, owners, modes,
    times and extended attributes (as ``SCHILY.xattr.*`` PAX records) as the image says them,
    entries in a stable order (the top layer's first). ``target``: a path (written under a
    temporary name, then renamed: whole or not at all), ``-`` for standard output, or a binary
    file object. Every layer's uncompressed bytes are checked against the config's diff_ids."""
    import tarfile
    if result.artifact_type is not None:
        raise UnsupportedError("%s is not a container image (%s): it has no tree to export"
                               % (result.reference, _printable(result.artifact_type, 100)))
    config = _loads_json(_read_blob(result.config.path), "config")
    diff_ids = _dict_at(config, "rootfs").get("diff_ids")
    if not isinstance(diff_ids, list) or len(diff_ids) != len(result.layers):
        raise IntegrityError("config of %s lists no diff_id for each layer" % result.reference)
    if not _have_sqlite():
        raise UnsupportedError("a flattened tar needs the sqlite3 module (to remember names without memory)")
    tmp = None
    if isinstance(target, str) and target != "-":
        if os.path.lexists(target):
            raise UsageError("the tar %s exists: refused" % target)
        if not os.path.isdir(os.path.dirname(os.path.abspath(target))):
            raise StorageError("cannot write the tar %s: its directory does not exist" % target)
        fd, tmp = _mkstemp(os.path.dirname(os.path.abspath(target)) or ".", prefix=".tmp-", suffix=".tar")
        out: Any = os.fdopen(fd, "wb")
    else:
        out = sys.stdout.buffer if target == "-" else target
    layers = list(reversed(result.layers))
    stream: Any = _LayerStream(layers, [check_digest(d, "diff_id")[0] for d in reversed(diff_ids)])
    flat = _Flattener(out)
    try:
        stream.start()
        for layer, diff_id in zip(layers, reversed(diff_ids)):
            try:
                tar = tarfile.open(fileobj=stream, mode="r:", tarinfo=_layer_tarinfo())
            except tarfile.ReadError as e:
                if str(e) != "empty file":
                    raise IntegrityError("layer %s is not a tar archive: %s" % (layer.digest, e)) from None
            else:
                try:
                    flat.layer_entries(tar, layer.digest)
                except (tarfile.TarError, EOFError) as e:
                    raise IntegrityError("layer %s is not a valid tar archive: %s" % (layer.digest, e)) from None
            actual = stream.finish()
            if actual != diff_id:
                raise IntegrityError("layer %s uncompressed to %s, but the config says %s (diff_id)"
                                     % (layer.digest, actual, diff_id))
        flat.finish()
        out.flush()
        if tmp is not None:
            out.close()
            os.link(tmp, target)
            _unlink(tmp)
    except OSError as e:
        raise StorageError("cannot write the tar %s: %s" % (target, e.strerror or e)) from None
    finally:
        stream.stop.set()
        flat.close()
        if tmp is not None:
            if not out.closed:
                out.close()
            _unlink(tmp)
    return target if isinstance(target, str) else "(a file object)"


def _check_archive_target(path: str, overwrite: bool = False) -> None:
    """Refuse, before anything is fetched, an archive path whose directory is missing or which
    exists (unless ``overwrite``): skopeo refuses it too, and a typo must not eat a file."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise StorageError("cannot write the docker archive %s: its directory %s does not exist" % (path, directory))
    if os.path.lexists(path) and not overwrite:
        raise UsageError("the docker archive %s exists: refused (--overwrite, or overwrite=True, replaces it)" % path)


def export_docker_archive(result: PullResult, path: str, overwrite: bool = False) -> str:
    """Write a `docker save`-format tar (also an OCI layout inside), atomically; an existing
    ``path`` is refused unless ``overwrite``."""
    return _docker_archive([result], path, overwrite)


def _docker_archive(results: List[PullResult], path: str, overwrite: bool = False) -> str:
    """One `docker save` tar holding ``results`` (as ``docker save a b`` writes it)."""
    import tarfile
    _check_archive_target(path, overwrite)
    blob_name = lambda d: "blobs/%s/%s" % tuple(d.split(":"))  # noqa: E731
    manifest, entries = [], []
    for result in results:
        ref = _reference(result.reference)
        local = isinstance(ref, (_LayoutReference, _ArchiveReference))  # no registry name to load it as
        tags = ["%s:%s" % (_familiar(ref), ref.tag)] if ref.tag and not local else []
        manifest.append({"Config": blob_name(result.config.digest), "RepoTags": tags,
                         "Layers": [blob_name(layer.digest) for layer in result.layers]})
        entry = _result_entry(result, ref.tag or "latest")
        if tags:
            entry["annotations"]["io.containerd.image.name"] = str(ref)
        entries.append(entry)
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = _mkstemp(directory, prefix=".tmp-", suffix=".tar")
    except OSError as e:
        raise StorageError("cannot write %s: %s" % (path, e.strerror or e)) from None
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            def add_bytes(name, data):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))

            add_bytes("oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
            add_bytes("index.json", json.dumps(index).encode())
            add_bytes("manifest.json", json.dumps(manifest).encode())
            seen = set()
            for blob in (b for result in results for b in result.blob_paths()):
                arc = "blobs/%s/%s" % (os.path.basename(os.path.dirname(blob)), os.path.basename(blob))
                if arc in seen:
                    continue
                seen.add(arc)
                info = tar.gettarinfo(blob, arcname=arc)
                info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = 0o644, 0, 0, 0, "", ""
                with open(blob, "rb") as src:
                    tar.addfile(info, src)
        if overwrite:
            os.replace(tmp, path)
        else:  # no clobbering, even of a file made meanwhile
            os.link(tmp, path)
            _unlink(tmp)
    except FileExistsError:
        _unlink(tmp)
        raise UsageError("the docker archive %s exists: refused (--overwrite, or overwrite=True, replaces it)"
                         % path) from None
    except OSError as e:
        _unlink(tmp)
        raise StorageError("cannot write %s: %s" % (path, e.strerror or e)) from None
    except BaseException:
        _unlink(tmp)
        raise
    return path


# -- rootfs ------------------------------------------------------------------------------
#
# Layers are applied in order as a container runtime applies them (OCI image-spec,
# layer.md "Applying Changesets"): whiteouts hide what lower layers put there, every name
# and link is resolved inside the root as chroot would, and nothing that a layer contains
# is ever followed out of it.  One thread decompresses and hashes (diff_id) ahead of the
# thread that creates files; zlib, zstd and hashlib release the GIL, so the two overlap.

_WHITEOUT = ".wh."
_MAX_TAR_HEADER = 1024 * 1024  # a pax or GNU long-name header's body: tarfile reads it whole
_MAX_DEPTH = 256  # directories in a name: deeper is refused as hostile (real trees are far shallower)
_MAX_SPARSE = 100000  # segments of one sparse file's map


class _HeaderBudget:
    """The layer stream while tarfile reads one member's headers: what it reads whole into
    memory (pax records, long names, GNU sparse maps and extension blocks) stops a little past
    _MAX_TAR_HEADER bytes, so a tiny compressed layer cannot make it build a huge map."""

    def __init__(self, stream: Any, left: int) -> None:
        self.stream, self.left = stream, left
        self.pax: Optional[int] = None  # the size of the pax header body read next, to check first

    def read(self, n: int = -1) -> bytes:
        if n < 0 or n > self.left:
            raise IntegrityError("a layer's tar headers (a sparse map?) run past %d bytes: refused (hostile)"
                                 % _MAX_TAR_HEADER)
        self.left -= n
        data = self.stream.read(n)
        if self.pax is not None:
            size, self.pax = self.pax, None
            _check_pax_records(data[:size])
        return data

    def __getattr__(self, name: str) -> Any:  # tell(), seek(): the stream's own
        return getattr(self.stream, name)


def _check_pax_records(body: bytes) -> None:
    """A pax header body must be whole records, each "LENGTH KEYWORD=VALUE\n" of its own length
    (zeros may pad the end). tarfile before 3.12.6 / 3.11.10 matches its record pattern from
    every start to the first "=" anywhere: a 200-byte gzip layer of "2 2 2 ...=" made it hold
    gigabytes. Checked here in one pass, whatever the Python."""
    pos, end = 0, len(body)
    while pos < end:
        if body[pos] == 0 and not body[pos:].strip(b"\0"):
            return  # padding
        space = body.find(b" ", pos, min(end, pos + 21))
        if space <= pos or not body[pos:space].isdigit():
            raise IntegrityError("a layer has a malformed pax header record at byte %d: refused (hostile)" % pos)
        length = int(body[pos:space])
        if length < 5 or pos + length > end or body[pos + length - 1] != 0x0a or \
                body.find(b"=", space + 2, pos + length - 1) < 0:
            raise IntegrityError("a layer has a malformed pax header record at byte %d: refused (hostile)" % pos)
        pos += length


_LAYER_TARINFO: List[Any] = []


def _layer_tarinfo() -> Any:
    """The TarInfo class layers are read with (made on first use: tarfile is not imported at start)."""
    if _LAYER_TARINFO:
        return _LAYER_TARINFO[0]
    import tarfile

    import struct

    fields = struct.Struct("100s8s8s8s12s12s8sc100s8x32s32s8s8s155s12x")  # ustar, as tarfile reads it
    reads_more = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                  tarfile.GNUTYPE_LONGLINK, tarfile.GNUTYPE_SPARSE)

    class _LayerTarInfo(tarfile.TarInfo):
        """tarfile's TarInfo, refusing the header bodies it would read whole into memory when
        they are larger than any real name or pax record set (a 1 MB layer could declare 1 GiB),
        and sparse maps longer than _MAX_SPARSE segments; a plain header is parsed in one go
        (tarfile's field-by-field parse was a third of extracting many small files)."""

        @classmethod
        def frombuf(cls, buf, encoding, errors):
            # What tarfile.TarInfo.frombuf makes of an octal, NUL-terminated, unsigned-checksum
            # header; anything else (base-256 numbers, old GNU sparse, a signed checksum, the end
            # of the archive, garbage) is left to it, errors and all.
            try:
                (name, mode, uid, gid, size, mtime, chksum, kind, linkname, uname, gname, major, minor,
                 prefix) = fields.unpack(buf)
                raw = (mode, uid, gid, size, mtime, chksum, major, minor)
                if kind == tarfile.GNUTYPE_SPARSE or (buf[100] | buf[108] | buf[116] | buf[124] | buf[136] | buf[148]
                                                      | buf[329] | buf[337]) & 0x80:
                    raise ValueError("not plain")  # (a base-256 number starts with 0x80 or 0xff)
                numbers = [int(n.split(b"\0", 1)[0].strip() or b"0", 8) for n in raw]
                if numbers[5] != 256 + sum(buf) - sum(buf[148:156]):
                    raise ValueError("not the unsigned checksum")
            except (struct.error, ValueError):
                return super().frombuf(buf, encoding, errors)
            obj = cls()
            obj.name = name.split(b"\0", 1)[0].decode(encoding, errors)
            obj.mode, obj.uid, obj.gid, obj.size, obj.mtime, obj.chksum, obj.devmajor, obj.devminor = numbers
            obj.type = kind
            obj.linkname = linkname.split(b"\0", 1)[0].decode(encoding, errors)
            obj.uname = uname.split(b"\0", 1)[0].decode(encoding, errors)
            obj.gname = gname.split(b"\0", 1)[0].decode(encoding, errors)
            if kind == tarfile.AREGTYPE and obj.name.endswith("/"):
                obj.type = tarfile.DIRTYPE
            if obj.isdir():
                obj.name = obj.name.rstrip("/")
            prefix = prefix.split(b"\0", 1)[0].decode(encoding, errors)
            if prefix and obj.type not in tarfile.GNU_TYPES:
                obj.name = prefix + "/" + obj.name
            return obj

        def _proc_member(self, tar):
            if self.type not in reads_more:  # nothing more is read for it: no budget to keep
                return getattr(super(), "_proc_member")(tar)
            if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE, tarfile.GNUTYPE_LONGNAME,
                             tarfile.GNUTYPE_LONGLINK) and self.size > _MAX_TAR_HEADER:
                raise IntegrityError("a layer has a %d-byte tar header: refused (hostile)" % self.size)
            stream = tar.fileobj
            if not isinstance(stream, _HeaderBudget):  # the outermost header of this member
                tar.fileobj = _HeaderBudget(stream, _MAX_TAR_HEADER + 16 * tarfile.BLOCKSIZE)
            if self.type in (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE):
                tar.fileobj.pax = self.size  # tarfile's next read is its body: checked before it parses
            try:
                member = getattr(super(), "_proc_member")(tar)  # tarfile's own hook, which this extends
            finally:
                tar.fileobj = stream
            if member.sparse is not None and len(member.sparse) > _MAX_SPARSE:
                raise IntegrityError("a layer has a sparse file of %d segments: refused (hostile)" % len(member.sparse))
            return member
    _LAYER_TARINFO.append(_LayerTarInfo)
    return _LayerTarInfo


_OPAQUE = ".wh..wh..opq"
_DIR_FDS = 256  # directory descriptors the extractor keeps open between entries
_READ_AHEAD = 4  # decompressed chunks (at most CHUNK each) buffered ahead of the extractor


def _hostile(layer, why):
    return IntegrityError("layer %s is hostile: %s; nothing was extracted" % (layer, why))


def _clean_name(name: str, layer: str) -> str:
    """A tar member name as a path relative to the root; refuses absolute names and escapes."""
    if "\x00" in name:
        raise _hostile(layer, "a name contains NUL")
    if name.startswith("/"):
        raise _hostile(layer, "absolute path %r" % name[:200])
    parts: List[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise _hostile(layer, "%r climbs out of the root" % name[:200])
            parts.pop()
            continue
        parts.append(part)
        if len(parts) > _MAX_DEPTH:
            raise _hostile(layer, "%r is more than %d directories deep" % (name[:200], _MAX_DEPTH))
    return "/".join(parts)


def _gunzip(f, name):
    """The decompressed chunks of a gzip file (several members and zero padding allowed)."""
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    data = b""
    while True:
        if not data:
            data = f.read(CHUNK)
            if not data:
                break
        try:
            out = d.decompress(data, CHUNK)  # bounded: a small bomb must not fill memory
        except zlib.error as e:
            raise IntegrityError("layer %s: the gzip stream is corrupt (%s)" % (name, e)) from None
        data = d.unconsumed_tail
        if out:
            yield out
        if d.eof:
            data = d.unused_data.lstrip(b"\0")
            while not data:
                more = f.read(CHUNK)
                if not more:
                    return
                data = more.lstrip(b"\0")
            d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.flush()
    except zlib.error as e:
        raise IntegrityError("layer %s: the gzip stream is corrupt (%s)" % (name, e)) from None
    if out:
        yield out
    if not d.eof:
        raise IntegrityError("layer %s: the gzip stream is truncated" % name)


def _unzstd(f, path, name):
    """The decompressed chunks of a zstd file: compression.zstd (3.14+), else the zstd program."""
    try:
        from compression import zstd  # novermin (Python 3.14+, guarded by the ImportError below)
    except ImportError:
        zstd = None
    if zstd is not None:
        try:
            with zstd.ZstdFile(f, mode="rb") as z:
                while True:
                    chunk = z.read(CHUNK)
                    if not chunk:
                        return
                    yield chunk
        except (zstd.ZstdError, EOFError) as e:
            raise IntegrityError("layer %s: zstd could not decompress it (%s)" % (name, e)) from None
        return
    if not shutil.which("zstd"):
        raise UnsupportedError("layer %s is zstd-compressed: needs Python 3.14+ (compression.zstd) or the zstd "
                               "program" % name)
    import subprocess
    proc = subprocess.Popen(["zstd", "-dcq", "--", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    try:
        while True:
            chunk = proc.stdout.read(CHUNK)
            if not chunk:
                break
            yield chunk
        err = proc.stderr.read(4096).decode("utf-8", "replace").strip()
        if proc.wait() != 0:
            raise IntegrityError("layer %s: zstd could not decompress it (%s)"
                                 % (name, _printable(err.splitlines()[-1] if err else "exit %d" % proc.returncode)))
    finally:  # never raises: the error that got us here is the one to report
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def _decompressed(path, name):
    """The uncompressed tar stream of a layer blob, in chunks, by its magic bytes (media types lie)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        magic = f.read(4)
        f.seek(0)
        if magic[:2] == b"\x1f\x8b":
            chunks = _gunzip(f, name)
        elif magic == b"\x28\xb5\x2f\xfd":
            chunks = _unzstd(f, path, name)
        else:
            chunks = iter(lambda: f.read(CHUNK), b"")
        for chunk in chunks:
            yield chunk


class _Stopped(Exception):
    pass


class _LayerStream(threading.Thread):
    """Decompresses and hashes the layers in order, ahead of the extractor; read() gives the
    current layer's tar stream and finish() its diff_id.  ``ready(layer)`` blocks until that
    layer's blob is verified in the store (a pull that extracts while it downloads)."""

    def __init__(self, layers, algos, ready=None):
        super().__init__(name="registry_pull-unpack", daemon=True)
        import queue  # here, not at start: only an extraction needs it
        self.layers, self.algos, self.ready = layers, algos, ready
        self.queue: queue.Queue = queue.Queue(_READ_AHEAD)
        self.full, self.empty = queue.Full, queue.Empty
        self.stop = threading.Event()
        self.buf: bytes = b""
        self.pos: int = 0
        self.end: Optional[str] = None
        self.offset = 0  # bytes of the current layer read so far (tarfile's tell())

    def run(self):
        # The diff_id is hashed on a third thread (hashlib lets go of the GIL, as zlib does):
        # decompressing and hashing on one thread made it the extraction's slowest.
        import queue
        chunks: queue.Queue = queue.Queue(_READ_AHEAD * 2)
        digests: queue.Queue = queue.Queue()

        def hash_all():
            hasher = None
            while True:
                item = chunks.get()
                if item is None:
                    return
                if isinstance(item, str):  # a layer begins (its algorithm) or ends ("")
                    if item:
                        hasher = hashlib.new(item)
                    else:
                        assert hasher is not None
                        digests.put("%s:%s" % (hasher.name, hasher.hexdigest()))
                    continue
                assert hasher is not None
                hasher.update(item)
        hashing = threading.Thread(target=hash_all, name="registry_pull-diff-id", daemon=True)
        hashing.start()
        try:
            for layer, algo in zip(self.layers, self.algos):
                if self.ready is not None:
                    self.ready(layer)
                chunks.put(algo)
                for chunk in _decompressed(layer.path, layer.digest):
                    self._put(chunk, chunks)
                chunks.put("")
                self._put(("end", digests.get()))
        except _Stopped:
            pass
        except BaseException as e:  # handed to the extracting thread
            try:
                self._put(("error", e))
            except _Stopped:
                pass
        finally:
            chunks.put(None)

    def _put(self, item, also=None):
        if also is not None:
            also.put(item)  # (never waits long: the hashing thread only hashes)
        while True:
            if self.stop.is_set():
                raise _Stopped()
            try:
                self.queue.put(item, timeout=0.25)
                return
            except self.full:
                continue

    def read(self, n: int = -1) -> bytes:
        """``n`` bytes, fewer only where the layer ends (tarfile takes a short header read for
        the end of the archive); n < 0: what is left of the current chunk."""
        out = self.read1(n)
        if n is None or n < 0 or len(out) == n or not out:
            return out
        parts = [out]
        left = n - len(out)
        while left:
            more = self.read1(left)
            if not more:
                break
            parts.append(more)
            left -= len(more)
        return b"".join(parts)

    def read1(self, n: int = -1) -> bytes:
        """At most ``n`` bytes, from the current chunk (a file's data is copied from it as it is)."""
        while self.pos >= len(self.buf):
            if self.end is not None:
                return b""
            try:
                item = self.queue.get(timeout=0.25)
            except self.empty:
                if self.stop.is_set():
                    raise Interrupted("interrupted")
                continue
            if isinstance(item, tuple):
                if item[0] == "error":
                    raise item[1]
                self.end = item[1]
                return b""
            self.buf, self.pos = item, 0
        end = len(self.buf) if n is None or n < 0 else self.pos + n
        out = self.buf[self.pos:end]
        self.pos += len(out)
        self.offset += len(out)
        return out

    # tell() and a forward seek() are all tarfile's "r:" mode asks of a file: it reads members
    # straight from these chunks, not through the 10 KiB records of its "r|" stream.
    def tell(self) -> int:
        return self.offset

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 1:
            offset += self.offset
        if whence not in (0, 1) or offset < self.offset:
            raise OSError(errno.ESPIPE, "a layer stream seeks forward only")
        while self.offset < offset and self.read1(min(CHUNK, offset - self.offset)):
            pass
        return self.offset

    def seekable(self) -> bool:
        return False

    def finish(self) -> str:
        """Read what is left of the current layer (tar padding); its diff_id."""
        while self.read1(CHUNK):
            pass
        digest, self.end, self.offset = self.end, None, 0
        return digest or ""


def _is_root() -> bool:
    return getattr(os, "geteuid", lambda: -1)() == 0  # Windows has no geteuid


_OVERRIDE_XATTR = "user.containers.override_stat"  # containers/storage's rootless record, fuse-overlayfs reads it
_MAX_XATTR = 65536  # bytes in one extended attribute's value (Linux's XATTR_SIZE_MAX)
_OWNERS = ("image", "self", "xattr")


def _entry_xattrs(info: tarfile.TarInfo, layer: str) -> Dict[str, bytes]:
    """The extended attributes a tar entry carries: PAX ``SCHILY.xattr.NAME`` records (GNU tar,
    Docker, buildah), and libarchive's ``LIBARCHIVE.xattr.NAME`` (name URL-encoded, value base64
    without padding). A value over 64 KiB is hostile."""
    found: Dict[str, bytes] = {}
    for key, value in (info.pax_headers or {}).items():
        if key.startswith("SCHILY.xattr."):
            name, data = key[len("SCHILY.xattr."):], value.encode("utf-8", "surrogateescape")
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote(key[len("LIBARCHIVE.xattr."):])
            try:
                data = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
            except ValueError:
                raise _hostile(layer, "%r has a malformed extended attribute %r" % (info.name[:100], name[:100]))
        else:
            continue
        if not name or "\x00" in name or len(name) > 255:
            raise _hostile(layer, "%r has an extended attribute with an impossible name" % info.name[:100])
        if len(data) > _MAX_XATTR:
            raise _hostile(layer, "%r has a %d-byte extended attribute %r" % (info.name[:100], len(data), name[:100]))
        found[name] = data
    return found


def _override_stat(uid: int, gid: int, mode: int, kind: str) -> bytes:
    """containers/storage's ``UID:GID:MODE:TYPE`` (mode in four octal digits, set-id and sticky
    bits kept; type file, dir, symlink, pipe, socket, char-MAJOR-MINOR or block-MAJOR-MINOR)."""
    return ("%d:%d:%04o:%s" % (uid, gid, mode & 0o7777, kind)).encode()


class _Unpacker:
    """Applies layer tar streams to ROOT: one handler per entry type, one removal routine.

    Every name is resolved from the root's descriptor, one component at a time, each opened
    ``O_DIRECTORY|O_NOFOLLOW`` (a symlink in the image is followed inside the root, as chroot
    would, by reading it, never by the kernel), and every file is made relative to its
    directory's descriptor with an exclusive create: a directory that someone swaps for a
    symlink while the extraction runs is never walked into. Directories get their mode, owner
    and times last (a read-only directory must not stop its children), in one pass of
    descriptors; until then every directory is 0700.
    """

    def __init__(self, root: str, root_fd: int, owners: Optional[str] = None) -> None:
        import tarfile
        self.root, self.root_fd = root, root_fd
        self.root_user = _is_root()
        self.owners = owners or ("image" if self.root_user else "self")
        if self.owners not in _OWNERS:
            raise UsageError("owners must be one of %s, not %r" % (", ".join(_OWNERS), owners))
        if self.owners == "image" and not self.root_user:
            raise UsageError("only root can give files the image's owners: as a normal user, owners=xattr records "
                             "them (user.containers.override_stat) or owners=self leaves them yours")
        self.owner = self.owners == "image"  # ownership is restored by root only
        self.umask = _umask()
        self.record = self.owners == "xattr"  # the image's owner, mode and type in an xattr instead
        # Extended attributes: what was set, what a normal user may not set (said once), and
        # whether the file system refused them (said once).
        self.dir_xattrs: Dict[str, Dict[str, bytes]] = {}
        self.dropped: Dict[str, int] = {}
        self.unsupported = 0
        # Every directory made or declared so far (relative, resolved) -> (mode, uid, gid, mtime):
        # each key is a real directory until _clear forgets it.
        self.dirs: Dict[str, Tuple[int, int, int, Optional[float]]] = {}
        self.root_info: Optional[tarfile.TarInfo] = None
        self.special = 0  # device nodes and set-id files made (the as-root warning)
        self.layer = ""
        self.lower = False  # is there a lower layer for whiteouts to hide?
        # This layer's own entries, for whiteouts (which hide lower layers only): trees it
        # created, and single entries it made in directories that were there before.
        self.new_dirs: Set[str] = set()
        self.added: Set[str] = set()
        self.own_parents: Set[str] = set()  # lower directories that hold some of these
        # Descriptors of the directories walked lately, by resolved name (every key a real
        # directory reached without a symlink at its end, until _clear forgets it): the next entry
        # is most often in one of them, and a descriptor, unlike a name, cannot be redirected by a
        # rename. At most _DIR_FDS, the least used let go first (closed once its entry is done).
        self.fds: Dict[str, int] = {}
        self.stale: List[int] = []  # descriptors to close once the entry using them is done
        self.handlers: Dict[bytes, Callable[[tarfile.TarFile, tarfile.TarInfo, str, int, str], None]] = {
            tarfile.DIRTYPE: self._make_dir, tarfile.SYMTYPE: self._make_symlink,
            tarfile.LNKTYPE: self._make_hardlink, tarfile.FIFOTYPE: self._make_fifo,
            tarfile.CHRTYPE: self._make_device, tarfile.BLKTYPE: self._make_device,
        }
        for t in tarfile.REGULAR_TYPES:
            self.handlers[t] = self._make_file

    # -- one layer ------------------------------------------------------------------------

    def apply(self, stream: Any, name: str) -> None:
        import tarfile
        self.layer = name
        self.new_dirs, self.added, self.own_parents = set(), set(), set()
        try:
            tar = tarfile.open(fileobj=stream, mode="r:", tarinfo=_layer_tarinfo())
        except tarfile.ReadError as e:
            if str(e) == "empty file":  # only end-of-archive blocks: a layer that changes nothing
                self.lower = True
                return
            raise IntegrityError("layer %s is not a tar archive: %s" % (name, e)) from None
        try:
            while True:
                info = tar.next()
                if info is None:
                    break
                setattr(tar, "members", [])  # tarfile keeps every member it read: constant memory instead
                try:
                    self._entry(tar, info)
                except (OverflowError, ValueError) as e:  # numbers no file system takes
                    raise _hostile(name, "%r: %s" % (info.name[:200], e)) from None
                except OSError as e:
                    if e.errno in (errno.ENOTDIR, errno.ENAMETOOLONG, errno.EINVAL, errno.ELOOP, errno.EISDIR):
                        # the entry's own doing (a name too long, a file where a directory must be)
                        raise _hostile(name, "%r: %s" % (info.name[:200], e.strerror)) from None
                    raise
                finally:
                    for fd in self.stale:
                        os.close(fd)
                    self.stale = []
        except (tarfile.TarError, EOFError) as e:
            raise IntegrityError("layer %s is not a valid tar archive: %s" % (name, e)) from None
        self.lower = True

    def close(self) -> None:
        self.stale.extend(self.fds.values())
        self.fds = {}
        for fd in self.stale:
            os.close(fd)
        self.stale = []

    def _entry(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> None:
        rel = _clean_name(info.name, self.layer)
        if not (isinstance(info.mtime, (int, float)) and -2 ** 40 < info.mtime < 2 ** 40) or \
                not (0 <= info.uid < 2 ** 32 and 0 <= info.gid < 2 ** 32):
            raise _hostile(self.layer, "%r has an impossible time or owner" % info.name[:200])
        if not rel:
            if info.isdir():
                self.root_info = info
            return
        head, _, base = rel.rpartition("/")
        if base.startswith(_WHITEOUT):
            self._whiteout(head, base)
            return
        handler = self.handlers.get(info.type)
        if handler is None:
            log.info("skipping %s: unsupported tar entry type %r", rel, info.type)
            return
        parent, fd = self._parent(head)
        handler(tar, info, parent + "/" + base if parent else base, fd, base)

    # -- names, resolved through descriptors ------------------------------------------------

    def _parent(self, head: str) -> Tuple[str, int]:
        """(resolved name, descriptor) of the directory ``head`` (a clean name) names, made where
        missing; the descriptor stays ours (valid until this entry is done)."""
        if not head:
            return "", self.root_fd
        fd = self.fds.pop(head, None)
        if fd is not None:  # a key is its own resolved name: nothing on the way is a symlink
            self.fds[head] = fd  # the most recently used, last
            return head, fd
        walked = self._walk(head, make=True)
        assert walked is not None
        return walked

    def _keep_fd(self, rel: str, fd: int) -> None:
        self.fds[rel] = fd
        if len(self.fds) > _DIR_FDS:
            oldest = next(iter(self.fds))
            self.stale.append(self.fds.pop(oldest))

    def _forget_dir(self, rel: str) -> None:
        fd = self.fds.pop(rel, None)
        if fd is not None:
            self.stale.append(fd)  # it may still be the descriptor this entry works in

    def _walk(self, rel: str, make: bool) -> Optional[Tuple[str, int]]:
        """(``rel`` resolved inside the root, a descriptor of that directory: ours, valid until
        this entry is done). Each component is opened O_NOFOLLOW from its parent's descriptor
        (or taken from the ones kept); a symlink is read and its target resolved inside the
        root (absolute ones from the root); with ``make``, a missing directory is made 0700
        (recorded 0755 root-owned, as umoci makes parents). Without ``make``: None when
        something on the way is missing or no directory."""
        parts = rel.split("/")
        done: List[str] = []
        fds: List[int] = []  # the descriptors of ``done``, each kept in self.fds or self.stale
        hops = 0
        while parts:
            part = parts.pop(0)
            if part in ("", "."):
                continue
            if part == "..":
                if done:
                    done.pop()
                    fds.pop()
                continue
            at = fds[-1] if fds else self.root_fd
            here = "/".join(done + [part])
            fd = self.fds.get(here)
            if fd is None:
                try:
                    fd = os.open(part, _O_DIR, dir_fd=at)
                except FileNotFoundError:
                    if not make:
                        return None
                    os.mkdir(part, 0o700, dir_fd=at)
                    self._mark(here, new_dir=True)
                    fd = os.open(part, _O_DIR, dir_fd=at)
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                        raise
                    try:
                        target = os.readlink(part, dir_fd=at)
                    except OSError:
                        if not make:
                            return None
                        raise _hostile(self.layer, "%r is below %r, which is not a directory"
                                       % (rel[:200], here[:200])) from None
                    hops += 1
                    if hops > 40:
                        raise _hostile(self.layer, "too many levels of symbolic links in %r" % rel[:200])
                    if target.startswith("/"):
                        fds, done = [], []
                    parts = target.split("/") + parts
                    continue
                self._keep_fd(here, fd)
            fds.append(fd)
            done.append(part)
            if len(done) > _MAX_DEPTH:
                raise _hostile(self.layer, "%r is more than %d directories deep" % (rel[:200], _MAX_DEPTH))
            if make and here not in self.dirs:
                self.dirs[here] = (0o755, 0, 0, None)
        return "/".join(done), fds[-1] if fds else self.root_fd

    # -- what this layer made -------------------------------------------------------------

    def _mark(self, rel: str, new_dir: bool = False) -> None:
        # Below a tree this layer made everything is its own already; below a lower directory it
        # declared again (its own too) the lower contents are not, so what it makes there is marked.
        if self.lower and not self._in_new_tree(rel.rpartition("/")[0]):
            self._own(rel, new_dir)

    def _own(self, rel: str, new_dir: bool = False) -> None:
        (self.new_dirs if new_dir else self.added).add(rel)
        parent = rel.rpartition("/")[0]
        while parent and parent not in self.own_parents:  # (each directory once: O(1) an entry)
            self.own_parents.add(parent)
            parent = parent.rpartition("/")[0]

    def _is_own(self, rel: str) -> bool:
        """Did this layer make ``rel`` (or a tree it is in)?"""
        return rel in self.added or self._in_new_tree(rel)

    def _in_new_tree(self, rel: str) -> bool:
        """Is ``rel`` in a directory tree that this layer created (so nothing lower is in it)?"""
        while rel:
            if rel in self.new_dirs:
                return True
            rel = rel.rpartition("/")[0]
        return False

    # -- removal: whiteouts and replacements -----------------------------------------------

    def _clear(self, rel: str, dir_fd: int, base: str) -> None:
        """Remove whatever is ``base`` in ``dir_fd`` (a directory with all below it) and forget it."""
        try:
            st = os.stat(base, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            # Forget what was removed, and only that: a scan of every remembered directory
            # per removal made a layer that whites out thousands of directories quadratic.
            for path in _rmtree_at(dir_fd, base):
                removed = rel + path[len(base):]
                self.dirs.pop(removed, None)
                self._forget_dir(removed)
        else:
            os.unlink(base, dir_fd=dir_fd)

    def _whiteout(self, head: str, base: str) -> None:
        if base.startswith(_WHITEOUT + _WHITEOUT) and base != _OPAQUE:
            return  # other .wh..wh. names are aufs bookkeeping (e.g. .wh..wh.plnk), not content
        name = base[len(_WHITEOUT):]
        if base != _OPAQUE and name in (".", ".."):
            raise _hostile(self.layer, "whiteout %r names no file" % (head + "/" + base)[:200])
        if not self.lower or not name:
            return  # nothing below the first layer to hide
        walked = self._walk(head, make=False)
        if walked is None:
            return  # nothing there to hide
        parent, fd = walked
        if base == _OPAQUE:
            # A directory this layer declared again (overlay writers list "x/" before
            # "x/.wh..wh..opq") still hides its lower contents; one it created has none.
            if (not parent or parent in self.dirs) and not self._in_new_tree(parent):
                self._hide_lower(parent, fd)
            return
        rel = parent + "/" + name if parent else name
        if rel in self.added and rel in self.dirs and not self._in_new_tree(parent):
            # A lower directory this layer listed again, then whited out (a name sorting before
            # ".wh.", e.g. "-c"): the lower contents go; the layer's directory and its own stay.
            self._keep_own_only(rel, fd, name, declared=True)
            return
        if self._is_own(rel):
            return  # a whiteout hides lower layers only (layer.md)
        if rel in self.own_parents:  # a lower directory this layer already wrote into: what it
            self._keep_own_only(rel, fd, name)  # wrote stays, in a directory of no metadata of its own
            return
        self._clear(rel, fd, name)

    def _keep_own_only(self, rel: str, fd: int, base: str, declared: bool = False) -> None:
        """Hide a lower directory's contents but for what this layer put below it; the directory
        stays only as their parent (recorded as a made parent is: 0755, root's), or, ``declared``
        by this layer, with what it said."""
        try:
            sub = os.open(base, _O_DIR, dir_fd=fd)
        except OSError:  # no directory there now: nothing of this layer's can be below it
            self._clear(rel, fd, base)
            return
        try:
            self._hide_lower(rel, sub)
        finally:
            os.close(sub)
        if not declared:
            self.dirs[rel] = (0o755, 0, 0, None)
            self.dir_xattrs.pop(rel, None)

    def _hide_lower(self, rel: str, fd: int) -> None:
        """Opaque directory: remove what lower layers put below ``rel``; keep this layer's entries."""
        for child in os.listdir(fd):
            crel = rel + "/" + child if rel else child
            if crel in self.new_dirs:
                continue
            if crel in self.added:
                if crel in self.dirs:  # a lower directory this layer declared again
                    cfd = os.open(child, _O_DIR, dir_fd=fd)
                    try:
                        self._hide_lower(crel, cfd)
                    finally:
                        os.close(cfd)
                continue
            if crel in self.own_parents:  # a lower directory this layer wrote into, not declared
                self._keep_own_only(crel, fd, child)
                continue
            self._clear(crel, fd, child)

    # -- one handler per entry type ---------------------------------------------------------

    def _make_dir(self, tar, info, rel, fd, base):
        if rel not in self.dirs:
            try:
                st: Optional[os.stat_result] = os.stat(base, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and not stat.S_ISDIR(st.st_mode):
                self._clear(rel, fd, base)
                st = None
            if st is None:
                os.mkdir(base, 0o700, dir_fd=fd)
                self._mark(rel, new_dir=True)
        elif self.lower and not self._is_own(rel):
            self._own(rel)  # declared again here: its lower contents may be hidden (opaque)
        self.dirs[rel] = (info.mode & 0o7777, info.uid, info.gid, info.mtime)
        self.dir_xattrs[rel] = self._xattrs(info, "dir")

    def _xattrs(self, info: tarfile.TarInfo, kind: str) -> Dict[str, bytes]:
        """What to set on the entry: its own attributes this process may keep, and, with
        owners=xattr, the image's owner, mode and type."""
        found = _entry_xattrs(info, self.layer)
        keep: Dict[str, bytes] = {}
        for name, value in found.items():
            if name.startswith("trusted.overlay.") or name == "security.selinux" or name == _OVERRIDE_XATTR:
                continue  # the host's (overlayfs, the SELinux policy) or ours to write
            if self.root_user or name.startswith("user."):
                keep[name] = value
            else:
                self.dropped[name] = self.dropped.get(name, 0) + 1
        if self.record:
            keep[_OVERRIDE_XATTR] = _override_stat(info.uid, info.gid, info.mode, kind)
        return keep

    def _set_xattrs(self, target: Any, attrs: Dict[str, bytes]) -> None:
        """Set ``attrs`` on ``target`` (a descriptor, or a /proc/self/fd path never followed at its end)."""
        for name, value in attrs.items():
            try:
                if isinstance(target, int):
                    os.setxattr(target, name, value)
                else:
                    os.setxattr(target, name, value, follow_symlinks=False)
            except OSError as e:
                if e.errno in (errno.ENOTSUP, getattr(errno, "EOPNOTSUPP", errno.ENOTSUP)):
                    self.unsupported += 1
                elif e.errno == errno.EPERM and name.startswith("user."):
                    self.unsupported += 1  # user.* on a FIFO or device node: Linux refuses it
                else:
                    raise

    def warnings(self) -> None:
        """What the tree could not keep, each said once."""
        if self.dropped:
            log.warning("extended attributes not kept as a normal user: %s", ", ".join(
                "%s on %d file%s" % (n, c, "" if c == 1 else "s") for n, c in sorted(self.dropped.items())))
        if self.unsupported:
            log.warning("%s: the file system refused %d extended attributes", self.root, self.unsupported)

    def _make_file(self, tar, info, rel, fd, base):
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC
        mode, attrs = info.mode & 0o7777, self._xattrs(info, "file")
        # Made with its mode where nothing comes between (no set-id bit for chown to clear, no
        # attribute a normal user needs write permission for, nothing the umask takes): no fchmod.
        final = not (attrs or mode & 0o7000 or mode & self.umask)
        try:  # most names are new: no look before, and O_EXCL never follows or reuses what is there
            out = os.open(base, flags, mode if final else 0o600, dir_fd=fd)
        except FileExistsError:
            self._clear(rel, fd, base)
            out = os.open(base, flags, mode if final else 0o600, dir_fd=fd)
        try:
            if info.sparse is None:
                # Straight from the stream (tarfile's file object adds two buffers per byte).
                left = info.size
                while left:
                    chunk = tar.fileobj.read1(min(CHUNK, left))
                    if not chunk:
                        raise IntegrityError("layer %s is truncated inside %r" % (self.layer, rel[:200]))
                    left -= len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(out, view):]
            else:  # a sparse file: its data segments, in order; the holes stay holes
                for offset, length in info.sparse:
                    while length:
                        chunk = tar.fileobj.read1(min(CHUNK, length))
                        if not chunk:
                            raise IntegrityError("layer %s is truncated inside %r" % (self.layer, rel[:200]))
                        os.lseek(out, offset, os.SEEK_SET)
                        view = memoryview(chunk)
                        while view:
                            view = view[os.write(out, view):]
                        offset += len(chunk)
                        length -= len(chunk)
                os.ftruncate(out, info.size)
            self._meta_fd(out, (mode, info.uid, info.gid, info.mtime), attrs, mode_set=final)
        finally:
            os.close(out)
        if info.mode & 0o6000:
            self.special += 1
        self._mark(rel)

    def _make_symlink(self, tar, info, rel, fd, base):
        try:
            os.symlink(info.linkname, base, dir_fd=fd)
        except FileExistsError:
            self._clear(rel, fd, base)
            os.symlink(info.linkname, base, dir_fd=fd)
        attrs = dict((n, v) for n, v in _entry_xattrs(info, self.layer).items()
                     if self.root_user and not n.startswith(("user.", "trusted.overlay.")) and n != "security.selinux")
        if attrs:  # a link's own (lsetxattr), through the directory's descriptor
            self._set_xattrs("/proc/self/fd/%d/%s" % (fd, base), attrs)
        self._set_meta(fd, base, info, link=True)
        self._mark(rel)

    def _make_hardlink(self, tar, info, rel, fd, base):
        name = _clean_name(info.linkname, self.layer)
        head, _, tbase = name.rpartition("/")
        walked = self._walk(head, make=False) if name else None
        if walked is None:
            raise _hostile(self.layer, "hard link %r -> %r points at nothing in the image"
                           % (info.name[:100], info.linkname[:100]))
        tparent, tfd = walked
        if (tparent + "/" + tbase if tparent else tbase) == rel:
            return  # a link to itself: nothing to do
        self._clear(rel, fd, base)
        try:
            st = os.stat(tbase, dir_fd=tfd, follow_symlinks=False)
        except FileNotFoundError:
            st = None
        if st is None or stat.S_ISDIR(st.st_mode):
            raise _hostile(self.layer, "hard link %r -> %r points at nothing in the image"
                           % (info.name[:100], info.linkname[:100]))
        # Shares its target's inode and metadata.
        os.link(tbase, base, src_dir_fd=tfd, dst_dir_fd=fd, follow_symlinks=False)
        self._mark(rel)

    def _make_fifo(self, tar, info, rel, fd, base):
        self._clear(rel, fd, base)
        if self.record:  # Linux refuses user.* on a FIFO: an empty file carries its record
            self._record_file(info, fd, base, "pipe")
            return
        os.mkfifo(base, 0o600, dir_fd=fd)
        self._set_meta(fd, base, info)
        attrs = self._xattrs(info, "pipe")
        if attrs:
            self._set_xattrs("/proc/self/fd/%d/%s" % (fd, base), attrs)
        self._mark(rel)

    def _record_file(self, info: tarfile.TarInfo, fd: int, base: str, kind: str) -> None:
        """An empty regular file standing for a FIFO or device node, its record in the xattr."""
        out = os.open(base, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600, dir_fd=fd)
        try:
            self._meta_fd(out, (info.mode & 0o777, info.uid, info.gid, info.mtime), self._xattrs(info, kind))
        finally:
            os.close(out)

    def _make_device(self, tar, info, rel, fd, base):
        if self.record:
            self._clear(rel, fd, base)
            self._record_file(info, fd, base, "%s-%d-%d" % ("char" if info.ischr() else "block",
                                                            info.devmajor, info.devminor))
            self._mark(rel)
            return
        if not self.root_user:
            log.info("skipping device node %s (only root may create it)", rel)
            return
        self._clear(rel, fd, base)
        kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
        try:
            os.mknod(base, kind | 0o600, os.makedev(info.devmajor, info.devminor), dir_fd=fd)
        except PermissionError:  # root without CAP_MKNOD (a container): as rootless tools do
            log.warning("skipping device node %s: this process may not create device nodes", rel)
            return
        self._set_meta(fd, base, info)
        self.special += 1
        self._mark(rel)

    def _set_meta(self, fd: int, base: str, info: tarfile.TarInfo, link: bool = False) -> None:
        """Owner, mode, times of what was just made as ``base`` in ``fd`` (0700 directories this
        process made: nobody else can have replaced it); a symlink's own, never its target's."""
        if self.owner:
            try:
                os.chown(base, info.uid, info.gid, dir_fd=fd, follow_symlinks=False)
            except OSError:
                pass
        if not link:
            os.chmod(base, info.mode & 0o7777, dir_fd=fd)  # a fifo or device made a moment ago
        try:
            os.utime(base, (info.mtime, info.mtime), dir_fd=fd, follow_symlinks=False)
        except (NotImplementedError, OSError):
            pass

    def _meta_fd(self, fd: int, meta: Tuple[int, int, int, Optional[float]],
                 xattrs: Optional[Dict[str, bytes]] = None, mode_set: bool = False) -> None:
        """Owner, extended attributes, mode (unless ``mode_set``: made with it), times, in that
        order: chown clears set-id bits and security.capability, and a normal user may set user.*
        only while the mode lets them write."""
        mode, uid, gid, mtime = meta
        if self.owner:
            try:
                os.fchown(fd, uid, gid)
            except OSError:
                pass
        if xattrs:
            self._set_xattrs(fd, xattrs)
        if not mode_set:
            os.fchmod(fd, mode)
        if mtime is not None and os.utime in os.supports_fd:
            try:
                os.utime(fd, (mtime, mtime))
            except OSError:
                pass

    # -- the end ------------------------------------------------------------------------

    def finish(self) -> None:
        """Directory metadata in one pass over the tree in name order (parents before children
        are opened, children before parents are given their modes), each directory opened from
        its parent's descriptor without following a symlink; one that a later layer removed or
        replaced is skipped. At most _MAX_DEPTH descriptors are open at once."""
        self.close()
        stack: List[Tuple[List[str], int]] = []

        def pop() -> None:
            parts, fd = stack.pop()
            if fd >= 0:
                try:
                    rel = "/".join(parts)
                    if rel in self.dirs:
                        self._meta_fd(fd, self.dirs[rel], self.dir_xattrs.get(rel) or (
                            {_OVERRIDE_XATTR: _override_stat(0, 0, 0o755, "dir")} if self.record else {}))
                finally:
                    os.close(fd)

        try:
            for rel in sorted(self.dirs, key=lambda r: r.split("/")):
                parts = rel.split("/")
                while stack and stack[-1][0] != parts[:len(stack[-1][0])]:
                    pop()
                for i in range(len(stack[-1][0]) if stack else 0, len(parts)):
                    at = stack[-1][1] if stack else self.root_fd
                    fd = -1
                    if at >= 0:
                        try:
                            fd = os.open(parts[i], _O_DIR, dir_fd=at)
                        except OSError:  # gone, not a directory, or a symlink (ELOOP): skipped
                            fd = -1
                    stack.append((parts[:i + 1], fd))
            while stack:
                pop()
            if self.record:  # fuse-overlayfs reads a tree's records only when its root has one
                info = self.root_info
                self._set_xattrs(self.root_fd, {_OVERRIDE_XATTR: _override_stat(
                    info.uid if info else 0, info.gid if info else 0, info.mode if info else 0o755, "dir")})
            self.warnings()
        finally:
            for _, fd in stack:
                if fd >= 0:
                    os.close(fd)


def _rmtree_at(dir_fd: int, name: str) -> List[str]:
    """Remove the directory ``name`` in ``dir_fd`` and everything below it: descriptors all the
    way (nothing is followed), a loop rather than recursion (no depth is too deep). Returns the
    directories removed, as paths from ``dir_fd`` ("name", "name/sub", ...)."""
    removed: List[str] = []
    stack: List[Tuple[int, str, str, List[str]]] = []
    fd = os.open(name, _O_DIR, dir_fd=dir_fd)
    stack.append((fd, name, name, os.listdir(fd)))
    try:
        while stack:
            fd, here, path, children = stack[-1]
            if not children:
                stack.pop()
                os.close(fd)
                os.rmdir(here, dir_fd=stack[-1][0] if stack else dir_fd)
                removed.append(path)
                continue
            child = children.pop()
            try:
                os.unlink(child, dir_fd=fd)
            except IsADirectoryError:
                cfd = os.open(child, _O_DIR, dir_fd=fd)
                stack.append((cfd, child, path + "/" + child, os.listdir(cfd)))
            except PermissionError:  # Linux says EISDIR; others may say EPERM for a directory
                if not stat.S_ISDIR(os.stat(child, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise
                cfd = os.open(child, _O_DIR, dir_fd=fd)
                stack.append((cfd, child, path + "/" + child, os.listdir(cfd)))
    finally:
        for fd, _, _, _ in stack:
            os.close(fd)
    return removed


def _check_rootfs_target(target: str) -> None:
    """A rootfs target must not exist, or be an empty directory that only its owner (this
    process's user) can change: another user could otherwise swap what is in it for links
    while it is filled."""
    if not os.path.lexists(target):
        return
    if not (os.path.isdir(target) and not os.path.islink(target) and not os.listdir(target)):
        raise UsageError("the rootfs target %s exists and is not an empty directory" % target)
    st = os.stat(target)
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        raise UsageError("the rootfs target %s belongs to uid %d, not to this user: refused (its owner could "
                         "change it while it is filled); use a new directory" % (target, st.st_uid))
    if st.st_mode & 0o022:
        raise UsageError("the rootfs target %s is writable by %s: refused (they could change it while it is "
                         "filled); chmod go-w it or use a new directory"
                         % (target, "others" if st.st_mode & 0o002 else "its group"))


def _open_to_others(path: str) -> bool:
    """Can every user reach ``path`` (search permission on it and every directory above)?"""
    while True:
        try:
            if not os.stat(path).st_mode & stat.S_IXOTH:
                return False
        except OSError:
            return False
        up = os.path.dirname(path)
        if up == path:
            return True
        path = up


def extract_rootfs(result: PullResult, target: str, owners: Optional[str] = None) -> str:
    """Extract the image's layers into ``target``: whole or not at all.

    A new ``target`` is built 0700 in a hidden sibling and renamed into place with the
    image's root mode; an existing empty directory is filled in place and keeps its owner
    and mode (emptied again on failure).  Raises IntegrityError for a hostile or corrupt
    layer (or a diff_id mismatch), StorageError when the file system refuses.
    """
    job = _RootfsJob(target, owners)
    job.unpack(result.reference, result.config, result.layers)
    return job.commit()


class _RootfsJob:
    """One extraction into DIR: unpack() builds it (in a thread of its own while a pull
    downloads, see start()), commit() puts it in place, discard() removes every trace."""

    def __init__(self, target: str, owners: Optional[str] = None) -> None:
        self.target = os.path.abspath(target)
        self.owners = owners
        _Unpacker(self.target, -1, owners)  # a bad owners= is refused before anything is fetched
        _check_rootfs_target(self.target)
        self.in_place = os.path.isdir(self.target)
        self.root: Optional[str] = None
        self.root_fd = -1  # the root, as opened when it was made or checked: never walked again by name
        self.unpacker: Optional[_Unpacker] = None
        self.stream: Optional[_LayerStream] = None
        self.thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    def start(self, reference, config, layers, ready):
        """unpack() in a thread; ``ready(blob)`` blocks until that blob is verified in the store."""
        def run():
            try:
                self.unpack(reference, config, layers, ready)
            except BaseException as e:  # handed to wait()
                self.error = e
        self.error = None
        self.thread = threading.Thread(target=run, name="registry_pull-rootfs", daemon=True)
        self.thread.start()

    def wait(self, cancel: Optional[_Cancel] = None) -> None:
        """The extraction's end (its error, if any); Ctrl-C and --timeout still end the wait."""
        while self.thread is not None and self.thread.is_alive():
            self.thread.join(0.25)
            if cancel is not None:
                cancel.check()
        if self.error is not None:
            raise self.error

    def unpack(self,
               reference: str,
               config: LayerResult,
               layers: Tuple[LayerResult, ...],
               ready: Optional[Callable[[LayerResult], None]] = None) -> None:
        try:
            if self.in_place:
                fd = os.open(self.target, _O_DIR)
                st = os.fstat(fd)  # what was opened is still the empty directory of the caller's own
                if os.listdir(fd) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()) or st.st_mode & 0o022:
                    os.close(fd)
                    raise UsageError("the rootfs target %s changed since it was checked: refused" % self.target)
                self.root, self.root_fd = self.target, fd
            else:
                os.makedirs(os.path.dirname(self.target), exist_ok=True)
                self.root = tempfile.mkdtemp(dir=os.path.dirname(self.target),
                                             prefix=".%s.rootfs-" % os.path.basename(self.target))
                self.root_fd = os.open(self.root, _O_DIR)
            if ready is not None:
                ready(config)
            with open(config.path, "rb") as f:
                doc = _loads_json(f.read(), "config")
            rootfs = _dict_at(doc, "rootfs")
            diff_ids = rootfs.get("diff_ids")
            if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
                raise IntegrityError("config of %s lists %s diff_ids for %d layers"
                                     % (reference, len(diff_ids) if isinstance(diff_ids, list) else "no",
                                        len(layers)))
            algos = [check_digest(d, "diff_id")[0] for d in diff_ids]
            self.stream = _LayerStream(layers, algos, ready)
            self.stream.start()
            self.unpacker = _Unpacker(self.root, self.root_fd, self.owners)
            for layer, diff_id in zip(layers, diff_ids):
                self.unpacker.apply(self.stream, layer.digest)
                actual = self.stream.finish()
                if actual != diff_id:
                    raise IntegrityError("layer %s uncompressed to %s, but the config says %s (diff_id)"
                                         % (layer.digest, actual, diff_id))
            self.unpacker.finish()
        except BaseException as e:
            self.discard()
            if isinstance(e, OSError):
                raise StorageError("cannot extract into %s: %s" % (self.target, e.strerror or e)) from None
            raise

    def commit(self) -> str:
        """The image's root mode on a new DIR, renamed into place; the as-root warning."""
        unpacker, root = self.unpacker, self.root
        assert unpacker is not None and root is not None
        try:
            if not self.in_place:
                info = unpacker.root_info
                mode = (info.mode & 0o7777) if info is not None else 0o755
                if unpacker.owner and info is not None:
                    os.fchown(self.root_fd, info.uid, info.gid)
                os.fchmod(self.root_fd, mode if unpacker.owner else mode & ~_umask())
                os.rename(root, self.target)
                self.root = None
            os.close(self.root_fd)
            self.root_fd = -1
        except OSError as e:
            self.discard()
            raise StorageError("cannot extract into %s: %s" % (self.target, e.strerror or e)) from None
        if unpacker.owner and unpacker.special and _open_to_others(self.target):
            log.warning("%s holds device nodes or set-id files and every user can reach it: put it in a "
                        "directory only root can enter (chmod 700 %s), as umoci's bundle is", self.target,
                        self.target if self.in_place else os.path.dirname(self.target))
        return self.target

    def discard(self):
        """Stop the extraction, if it runs, and remove what it made."""
        if self.stream is not None:
            self.stream.stop.set()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(10)
            if self.thread.is_alive():  # its descriptors are still in use: leave them to it
                log.warning("the extraction into %s did not stop; its remains are left", self.target)
                return
        if self.unpacker is not None:
            self.unpacker.close()
        if self.root is not None and self.root_fd >= 0:
            _discard_rootfs(self.root, self.root_fd, self.in_place)
        if self.root_fd >= 0:
            os.close(self.root_fd)
        self.root, self.root_fd = None, -1


def _discard_rootfs(root: str, root_fd: int, in_place: bool) -> None:
    """Remove a failed extraction: what was put in the caller's directory, or the hidden
    sibling; through the root's descriptor, without recursion and without following links."""
    try:
        for name in os.listdir(root_fd):
            try:
                os.unlink(name, dir_fd=root_fd)
            except IsADirectoryError:
                _rmtree_at(root_fd, name)
        if not in_place:
            os.rmdir(root)
    except OSError as e:
        log.warning("could not remove all of the failed extraction %s: %s", root, e.strerror or e)


# --------------------------------------------------------------------------- Signatures
# ECDSA P-256 / SHA-256 verification (what cosign's keys sign with), written here because
# neither ssl nor hashlib offers it: verification only, of public data, so constant time is not
# a concern; correctness is (Project Wycheproof's vectors are the tests). SEC 1 v2, FIPS 186-4.

# -- Curve parameters: y^2 = x^3 + a*x + b over GF(p), base point G of prime order n, cofactor 1. ---
_P256_P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_P256_A = _P256_P - 3
_P256_B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_P256_GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
_P256_GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_P256_COORD_BYTES = 32
_P256_WNAF_WIDTH = 5

# DER of AlgorithmIdentifier { id-ecPublicKey (1.2.840.10045.2.1), prime256v1 (1.2.840.10045.3.1.7) }.
_P256_SPKI_ALGORITHM = bytes.fromhex("301306072a8648ce3d020106082a8648ce3d030107")
_DER_SEQUENCE = 0x30
_DER_INTEGER = 0x02
_DER_BIT_STRING = 0x03
_DER_MAX_LENGTH_OCTETS = 4

_PEM_PUBLIC_KEY_RE = _Pattern(
    r"[ \t\r\n]*-----BEGIN PUBLIC KEY-----([A-Za-z0-9+/=\t\r\n ]*)-----END PUBLIC KEY-----[ \t\r\n]*"
)
_PEM_BASE64_RE = _Pattern(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")

_AffinePoint = Tuple[int, int]
_JacobianPoint = Tuple[int, int, int]  # (X, Y, Z) stands for (X / Z^2, Y / Z^3); Z == 0 is infinity.
_JACOBIAN_INFINITY: _JacobianPoint = (1, 1, 0)


# -- Strict DER reading -------------------------------------------------------------------------------


def _der_read(buf: bytes, pos: int, end: int, tag: int) -> Optional[Tuple[int, int]]:
    """Read one DER element with the given one-byte tag at buf[pos:end].

    Return (content_start, content_end), or None if the tag differs or the length is truncated,
    indefinite, or not minimally encoded.
    """
    if pos + 2 > end or buf[pos] != tag:
        return None
    first = buf[pos + 1]
    pos += 2
    if first < 0x80:
        length = first
    else:
        count = first & 0x7F
        if count == 0 or count > _DER_MAX_LENGTH_OCTETS or pos + count > end or buf[pos] == 0:
            return None
        length = int.from_bytes(buf[pos:pos + count], "big")
        if length < 0x80:
            return None
        pos += count
    if pos + length > end:
        return None
    return pos, pos + length


def _der_positive_integer(content: bytes) -> Optional[int]:
    """Decode the content octets of a DER INTEGER that must be non-negative and minimally encoded."""
    if not content or content[0] & 0x80:
        return None
    if len(content) > 1 and content[0] == 0 and not content[1] & 0x80:
        return None
    return int.from_bytes(content, "big")


def _parse_der_signature(der: Union[bytes, bytearray, memoryview]) -> Optional[Tuple[int, int]]:
    """Parse a DER ECDSA-Sig-Value SEQUENCE { r INTEGER, s INTEGER } strictly.

    Return (r, s) with both in [1, n-1], or None for any other input (including BER encodings,
    trailing data and wrong types).
    """
    if not isinstance(der, (bytes, bytearray, memoryview)):
        return None
    buf = bytes(der)
    seq = _der_read(buf, 0, len(buf), _DER_SEQUENCE)
    if seq is None or seq[1] != len(buf):
        return None
    r_pos = _der_read(buf, seq[0], seq[1], _DER_INTEGER)
    if r_pos is None:
        return None
    s_pos = _der_read(buf, r_pos[1], seq[1], _DER_INTEGER)
    if s_pos is None or s_pos[1] != seq[1]:
        return None
    r = _der_positive_integer(buf[r_pos[0]:r_pos[1]])
    s = _der_positive_integer(buf[s_pos[0]:s_pos[1]])
    if r is None or s is None or not 0 < r < _P256_N or not 0 < s < _P256_N:
        return None
    return r, s


# -- Public key loading ---------------------------------------------------------------------------------


def _pem_public_key_der(pem: Union[str, bytes, bytearray]) -> Optional[bytes]:
    """Return the DER inside a single "PUBLIC KEY" PEM block, or None if the text is not exactly that."""
    if isinstance(pem, (bytes, bytearray)):
        try:
            text = bytes(pem).decode("ascii")
        except UnicodeDecodeError:
            return None
    elif isinstance(pem, str):
        text = pem
    else:
        return None
    match = _PEM_PUBLIC_KEY_RE.fullmatch(text)
    if match is None:
        return None
    body = re.sub(r"[ \t\r\n]+", "", match.group(1))
    if not body or _PEM_BASE64_RE.fullmatch(body) is None:
        return None
    return base64.b64decode(body, validate=True)


def _p256_on_curve(x: int, y: int) -> bool:
    """Return True if the affine point (x, y), with coordinates already in [0, p-1], lies on P-256."""
    return (y * y - (x * x * x + _P256_A * x + _P256_B)) % _P256_P == 0


def _p256_decompress(x: int, odd: bool) -> Optional[_AffinePoint]:
    """Recover the point with x-coordinate x and the given y parity (p = 3 mod 4, so sqrt is a power)."""
    rhs = (x * x * x + _P256_A * x + _P256_B) % _P256_P
    y = pow(rhs, (_P256_P + 1) // 4, _P256_P)
    if y * y % _P256_P != rhs:
        return None
    if bool(y & 1) != odd:
        y = (_P256_P - y) % _P256_P
    if bool(y & 1) != odd:
        return None
    return x, y


def _p256_decode_point(octets: bytes) -> Optional[_AffinePoint]:
    """Decode a SEC 1 uncompressed (04||X||Y) or compressed (02/03||X) point; None unless valid on P-256."""
    size = _P256_COORD_BYTES
    if len(octets) == 1 + 2 * size and octets[0] == 0x04:
        x = int.from_bytes(octets[1:1 + size], "big")
        y = int.from_bytes(octets[1 + size:], "big")
        if x >= _P256_P or y >= _P256_P or not _p256_on_curve(x, y):
            return None
        return x, y
    if len(octets) == 1 + size and octets[0] in (0x02, 0x03):
        x = int.from_bytes(octets[1:], "big")
        if x >= _P256_P:
            return None
        return _p256_decompress(x, octets[0] == 0x03)
    return None


def _load_public_key(pem: Union[str, bytes, bytearray]) -> Optional[_AffinePoint]:
    """Load a P-256 public key from a PEM SubjectPublicKeyInfo; return its affine point (x, y) or None.

    Only id-ecPublicKey with the named curve prime256v1 is accepted; explicit curve parameters,
    other curves and other key types give None.
    """
    der = _pem_public_key_der(pem)
    if der is None:
        return None
    spki = _der_read(der, 0, len(der), _DER_SEQUENCE)
    if spki is None or spki[1] != len(der):
        return None
    algorithm_end = spki[0] + len(_P256_SPKI_ALGORITHM)
    if der[spki[0]:algorithm_end] != _P256_SPKI_ALGORITHM:
        return None
    bits = _der_read(der, algorithm_end, spki[1], _DER_BIT_STRING)
    if bits is None or bits[1] != spki[1] or bits[1] - bits[0] < 2 or der[bits[0]] != 0:
        return None
    return _p256_decode_point(der[bits[0] + 1:bits[1]])


# -- Point arithmetic in Jacobian coordinates -----------------------------------------------------------


def _jacobian_double(pt: _JacobianPoint) -> _JacobianPoint:
    """Return 2*pt (formula dbl-2001-b, which uses a = -3)."""
    x, y, z = pt
    if z == 0 or y == 0:
        return _JACOBIAN_INFINITY
    p = _P256_P
    delta = z * z % p
    gamma = y * y % p
    beta = x * gamma % p
    alpha = 3 * (x - delta) * (x + delta) % p
    x3 = (alpha * alpha - 8 * beta) % p
    z3 = ((y + z) * (y + z) - gamma - delta) % p
    y3 = (alpha * (4 * beta - x3) - 8 * gamma * gamma) % p
    return x3, y3, z3


def _jacobian_add(pt1: _JacobianPoint, pt2: _JacobianPoint) -> _JacobianPoint:
    """Return pt1 + pt2, handling infinity, pt1 == pt2 and pt1 == -pt2 (formula add-1998-cmo-2)."""
    x1, y1, z1 = pt1
    x2, y2, z2 = pt2
    if z1 == 0:
        return pt2
    if z2 == 0:
        return pt1
    p = _P256_P
    z1z1 = z1 * z1 % p
    z2z2 = z2 * z2 % p
    u1 = x1 * z2z2 % p
    u2 = x2 * z1z1 % p
    s1 = y1 * z2 * z2z2 % p
    s2 = y2 * z1 * z1z1 % p
    if u1 == u2:
        return _jacobian_double(pt1) if s1 == s2 else _JACOBIAN_INFINITY
    h = u2 - u1
    r = s2 - s1
    hh = h * h % p
    hhh = h * hh % p
    v = u1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    y3 = (r * (v - x3) - s1 * hhh) % p
    z3 = z1 * z2 * h % p
    return x3, y3, z3


def _jacobian_negate(pt: _JacobianPoint) -> _JacobianPoint:
    """Return -pt."""
    return pt[0], (_P256_P - pt[1]) % _P256_P, pt[2]


def _wnaf(k: int, width: int) -> List[int]:
    """Width-w non-adjacent form of k >= 0: odd digits in (-2^(w-1), 2^(w-1)) or 0, least significant first."""
    digits: List[int] = []
    window = 1 << width
    while k:
        digit = 0
        if k & 1:
            digit = k & (window - 1)
            if digit >= window >> 1:
                digit -= window
            k -= digit
        digits.append(digit)
        k >>= 1
    return digits


def _odd_multiples(pt: _AffinePoint, width: int) -> List[_JacobianPoint]:
    """Return [1*pt, 3*pt, 5*pt, ..., (2^(w-1) - 1)*pt] in Jacobian coordinates."""
    first: _JacobianPoint = (pt[0], pt[1], 1)
    twice = _jacobian_double(first)
    table = [first]
    for _ in range((1 << (width - 2)) - 1):
        table.append(_jacobian_add(table[-1], twice))
    return table


def _p256_mul_add(k1: int, pt1: _AffinePoint, k2: int, pt2: _AffinePoint) -> _JacobianPoint:
    """Return k1*pt1 + k2*pt2 by interleaved wNAF (Shamir/Straus trick): one shared chain of doublings."""
    width = _P256_WNAF_WIDTH
    terms = [(_wnaf(k1, width), _odd_multiples(pt1, width)), (_wnaf(k2, width), _odd_multiples(pt2, width))]
    acc = _JACOBIAN_INFINITY
    for i in range(max(len(terms[0][0]), len(terms[1][0])) - 1, -1, -1):
        acc = _jacobian_double(acc)
        for digits, table in terms:
            digit = digits[i] if i < len(digits) else 0
            if digit > 0:
                acc = _jacobian_add(acc, table[digit >> 1])
            elif digit < 0:
                acc = _jacobian_add(acc, _jacobian_negate(table[(-digit) >> 1]))
    return acc


# -- ECDSA ----------------------------------------------------------------------------------------------


def _ecdsa_p256_verify_digest(q: _AffinePoint, r: int, s: int, digest: bytes) -> bool:
    """Check the ECDSA equation for r, s in [1, n-1] and a 32-byte digest (SEC 1 v2, section 4.1.4)."""
    e = int.from_bytes(digest, "big") % _P256_N  # 256-bit digest and 256-bit n: no truncation needed.
    w = pow(s, -1, _P256_N)
    x, _, z = _p256_mul_add(e * w % _P256_N, (_P256_GX, _P256_GY), r * w % _P256_N, q)
    if z == 0:
        return False
    z_inv = pow(z, -1, _P256_P)
    return x * z_inv * z_inv % _P256_P % _P256_N == r


def verify_signature(
    public_key_pem: Union[str, bytes, bytearray],
    signature_der: Union[bytes, bytearray, memoryview],
    data: Union[bytes, bytearray, memoryview],
) -> bool:
    """Verify a DER-encoded ECDSA P-256 / SHA-256 signature of data under a PEM "PUBLIC KEY".

    Return True only for a valid signature. Any malformed key or signature, a key on another
    curve or of another type, or an argument of the wrong type gives False; no exception is raised.
    """
    try:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return False
        q = _load_public_key(public_key_pem)
        rs = _parse_der_signature(signature_der)
        if q is None or rs is None:
            return False
        return _ecdsa_p256_verify_digest(q, rs[0], rs[1], hashlib.sha256(data).digest())
    except Exception:  # Defence in depth: a verifier must answer False, never raise.
        return False


# -- what cosign and sigstore put in a registry, checked offline ------------------------------

MT_SIMPLESIGNING = "application/vnd.dev.cosign.simplesigning.v1+json"
MT_SIGSTORE_BUNDLE = "application/vnd.dev.sigstore.bundle.v0.3+json"
_COSIGN_SIGNATURE = "dev.cosignproject.cosign/signature"
_COSIGN_TYPE = "cosign container image signature"
_COSIGN_SUFFIXES = (".sig", ".att", ".sbom")
_IN_TOTO = "application/vnd.in-toto+json"
_COSIGN_SIGN_PREDICATE = "https://sigstore.dev/cosign/sign/v1"  # a signature, not an attestation


def _load_keys(keys: Any) -> List[Union[str, bytes]]:
    """The public keys given (PEM text or bytes), each checked to be an ECDSA P-256 key."""
    out = []
    for i, key in enumerate(keys or ()):
        if not isinstance(key, (str, bytes)) or _load_public_key(key) is None:
            raise UsageError("verify key %d is not a PEM ECDSA P-256 public key (as cosign generate-key-pair "
                             "writes it)" % (i + 1))
        out.append(key)
    return out


def _same_repository(signed: str, wanted: str) -> bool:
    """Does a signed ``docker-reference`` name the repository ``wanted`` (REGISTRY/PATH)? Both
    normalised as references are (docker.io's other spellings included); tag or digest ignored."""
    def norm(text: str) -> Optional[str]:
        try:
            ref = parse_reference(text.strip())
        except PullError:
            return None
        registry = _DOCKER_HUB if ref.registry in ("index.docker.io", _DOCKER_HUB_ENDPOINT) else ref.registry
        return "%s/%s" % (registry, ref.repository)
    a, b = norm(signed), norm(wanted)
    return a is not None and a == b


def _dsse_pae(payload_type: str, body: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what a DSSE signature signs."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %s %d %s" % (len(kind), kind, len(body), body)


class _SignatureCheck:
    """Is an image signed by one of ``keys`` (cosign's ``sha256-HEX.sig`` simple signing, or a
    sigstore bundle referrer)? Says what it found when not: every reason is kept for the one line."""

    def __init__(self, repo: _Repository, keys: List[Union[str, bytes]], identity: str) -> None:
        self.repo, self.keys, self.identity = repo, keys, identity
        self.found: List[str] = []
        self.known: Dict[str, bool] = {}

    def signed(self, digest: str) -> bool:
        if digest not in self.known:
            self.known[digest] = self._cosign(digest) or self._bundles(digest)
        return self.known[digest]

    def require(self, what: str, digests: List[str]) -> None:
        """SignatureError (one line: what was found) unless one of ``digests`` is signed."""
        if any(self.signed(d) for d in digests):
            return
        found = list(dict.fromkeys(self.found))
        raise SignatureError("%s is not signed by %s: %s" % (
            what, "the key given" if len(self.keys) == 1 else "any of the %d keys given" % len(self.keys),
            "; ".join(found) if found else "no signature (no sha256-HEX.sig tag, no sigstore bundle referrer)"))

    def _by_key(self, signature: bytes, data: bytes) -> bool:
        return any(verify_signature(key, signature, data) for key in self.keys)

    def _cosign(self, digest: str) -> bool:
        tag = digest.replace(":", "-") + ".sig"
        try:
            _, data, content_type = self.repo.manifest(tag, what="%s:%s" % (self.repo.name, tag))
            manifest = parse_manifest(data, content_type, "signature manifest %s" % tag)
        except NotFound:
            return False
        except IntegrityError as e:
            self.found.append("a signature manifest that cannot be read (%s)" % e)
            return False
        for layer in manifest.layers:
            if layer.media_type != MT_SIMPLESIGNING:
                continue
            try:
                signature = base64.b64decode((layer.annotations or {}).get(_COSIGN_SIGNATURE) or "", validate=True)
                payload = self.repo.small_blob(layer, "signature payload")
                critical = _dict_at(_loads_json(payload, "signature payload"), "critical")
            except (ValueError, PullError) as e:
                self.found.append("a signature that cannot be read (%s)" % e)
                continue
            if not self._by_key(signature, payload):
                self.found.append("a signature by another key")
                continue
            signed_digest = _dict_at(critical, "image").get("docker-manifest-digest")
            signed_repo = _dict_at(critical, "identity").get("docker-reference")
            if critical.get("type") != _COSIGN_TYPE:
                self.found.append("a signed payload of another type (%r)" % _printable(critical.get("type"), 60))
            elif signed_digest != digest:
                self.found.append("a signature for another digest (%s)" % _printable(signed_digest, 80))
            elif not isinstance(signed_repo, str) or not _same_repository(signed_repo, self.identity):
                self.found.append("a signature for another repository (%s, not %s)"
                                  % (_printable(signed_repo, 100), self.identity))
            else:
                log.info("%s is signed (cosign, %s)", digest, tag)
                return True
        if not any(layer.media_type == MT_SIMPLESIGNING for layer in manifest.layers):
            self.found.append("a %s tag that holds no simple-signing signature" % tag)
        return False

    def _bundles(self, digest: str) -> bool:
        for desc in _all_referrers(self.repo, digest):
            if desc.artifact_type != MT_SIGSTORE_BUNDLE:
                continue
            try:
                _, data, content_type = self.repo.manifest(desc.digest, what="%s@%s" % (self.repo.name, desc.digest))
                manifest = parse_manifest(data, content_type, "bundle manifest %s" % desc.digest)
                layer = next((d for d in manifest.layers if d.media_type == MT_SIGSTORE_BUNDLE), None)
                if layer is None:
                    raise IntegrityError("no bundle layer")
                bundle = _loads_json(self.repo.small_blob(layer, "sigstore bundle"), "sigstore bundle")
                envelope = _dict_at(bundle, "dsseEnvelope")
                body = base64.b64decode(str(envelope.get("payload") or ""), validate=True)
                kind = str(envelope.get("payloadType") or "")
                sigs = [base64.b64decode(str(_as_dict(s).get("sig") or ""), validate=True)
                        for s in _list_at(envelope, "signatures")]
            except (ValueError, PullError) as e:
                self.found.append("a sigstore bundle that cannot be read (%s)" % e)
                continue
            if not any(self._by_key(sig, _dsse_pae(kind, body)) for sig in sigs):
                self.found.append("a sigstore bundle signed by another key")
                continue
            try:
                statement = _loads_json(body, "in-toto statement")
            except IntegrityError:
                self.found.append("a sigstore bundle whose statement is not JSON")
                continue
            if kind != _IN_TOTO or statement.get("predicateType") != _COSIGN_SIGN_PREDICATE:
                # An SBOM or provenance attestation signed by the key is not a signature of the image.
                self.found.append("a sigstore bundle that is no image signature (%s, %s)"
                                  % (_printable(kind, 60), _printable(statement.get("predicateType"), 80)))
                continue
            algo, hexpart = digest.split(":", 1)
            subjects = [_as_dict(s) for s in _list_at(statement, "subject")]
            ours = [s for s in subjects if _dict_at(s, "digest").get(algo) == hexpart]
            if not ours:
                self.found.append("a sigstore bundle for another digest")
                continue
            names = [str(s["name"]) for s in ours if isinstance(s.get("name"), str)]
            if not any(_same_repository(n, self.identity) for n in names):
                self.found.append("a sigstore bundle for another repository (%s, not %s)"
                                  % (_printable(", ".join(map(str, names)) or "no name", 100), self.identity))
                continue
            log.info("%s is signed (sigstore bundle %s)", digest, desc.digest)
            return True
        return False


def _all_referrers(repo: _Repository, digest: str) -> List[Descriptor]:
    """What refers to ``digest``: the OCI 1.1 referrers API, else the referrers tag schema
    (``sha256-HEX`` holding an index), plus cosign's tags (``sha256-HEX.sig``, ``.att``,
    ``.sbom``: each a descriptor named by its tag, ``org.opencontainers.image.ref.name``)."""
    found = repo.referrers(digest)
    base = digest.replace(":", "-")
    if found is None:  # no referrers API: the tag schema, as a client pushing to such a registry writes it
        found = []
        try:
            _, data, content_type = repo.manifest(base, accept=MT_OCI_INDEX, what="%s:%s" % (repo.name, base))
            index = parse_manifest(data, content_type, "referrers index %s" % base)
            found = list(index.manifests) if index.is_index else []
        except NotFound:
            pass
    for suffix in _COSIGN_SUFFIXES:
        tag = base + suffix
        if isinstance(repo, _Repository) and not repo.has_manifest(tag):
            continue  # a HEAD each: most images have no attestation or SBOM tag
        try:
            d, data, content_type = repo.manifest(tag, what="%s:%s" % (repo.name, tag))
        except NotFound:
            continue
        m = parse_manifest(data, content_type, "%s:%s" % (repo.name, tag))
        found.append(Descriptor(m.media_type, d, len(data), None, {_REF_NAME: tag}, m.artifact_type))
    return found


# --------------------------------------------------------------------------- Public API


class LayerResult(_Record):
    digest: str
    media_type: str
    size: int
    path: str


class PullResult(_Record):
    """What a pull produced; ``to_json()`` is the CLI's ``--json``."""

    reference: str
    manifest_digest: str
    manifest_media_type: str
    index_digest: Optional[str]
    index_media_type: Optional[str]
    platform: Platform
    config: LayerResult
    layers: Tuple[LayerResult, ...]
    home: str
    manifest_size: int = 0
    downloaded_bytes: int = 0
    recorded: bool = True
    outputs: Tuple[Tuple[str, str], ...] = ()
    platform_match: str = ""  # "exact", "compatible (...)", "no platform given", "pinned by digest (...)"
    artifact_type: Optional[str] = None  # set for anything that is not a runnable image (README: artifacts)

    @property
    def manifest_path(self) -> str:
        algo, hexpart = check_digest(self.manifest_digest)
        return os.path.join(self.home, "blobs", algo, hexpart)

    def blob_paths(self) -> List[str]:
        """Every blob of the image in the store: manifest, config, layers."""
        return [self.manifest_path, self.config.path] + [layer.path for layer in self.layers]

    @property
    def size(self) -> int:
        """The image's real size: config plus layers (what a user downloads once)."""
        return self.config.size + sum(layer.size for layer in self.layers)

    def to_json(self) -> dict:
        return {
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "manifest_media_type": self.manifest_media_type,
            "index_digest": self.index_digest,
            "platform": str(self.platform),
            "platform_details": dict(
                [("os", self.platform.os), ("architecture", self.platform.architecture)]
                + ([("variant", self.platform.variant)] if self.platform.variant else [])
                + ([("os.version", self.platform.os_version)] if self.platform.os_version else [])
                + ([("os.features", list(self.platform.os_features))] if self.platform.os_features else [])),
            "platform_match": self.platform_match,
            "artifact_type": self.artifact_type,
            "config_digest": self.config.digest,
            "config_path": self.config.path,
            "size": self.size,
            "downloaded_bytes": self.downloaded_bytes,
            "home": self.home,
            "layers": [layer.as_dict() for layer in self.layers],
            "outputs": dict(self.outputs),
        }


def _parse_mirror(text: str, insecure: bool = False) -> Tuple[str, Optional[str]]:
    """``[http[s]://]host[:port][/]`` -> (host:port, scheme or None to discover).

    Plain HTTP follows the registries' rule: loopback, or --insecure.
    """
    parts = urllib.parse.urlsplit(text if "://" in text else "//" + text)
    if parts.scheme not in ("", "http", "https") or not parts.netloc or parts.path not in ("", "/") or \
            parts.query or parts.fragment or not _HOST_RE.fullmatch(parts.netloc):
        raise UsageError("invalid mirror %r: expected [http[s]://]HOST[:PORT]" % text)
    if parts.scheme == "http" and not insecure and not _is_loopback(parts.netloc):
        raise UsageError("mirror %s is plain HTTP: only loopback mirrors may use it without --insecure "
                         "(credentials and images would cross the network unprotected)" % text)
    return parts.netloc.lower(), parts.scheme or None


def _mirrors_for(ref: Reference, mirrors: Optional[List[str]], insecure: bool) -> List[Tuple[str, Optional[str]]]:
    """The mirrors to try, in order: those given, else (for docker.io) $REGISTRY_PULL_MIRRORS."""
    if mirrors is None and ref.registry == _DOCKER_HUB:
        mirrors = [m for m in re.split(r"[\s,]+", os.environ.get("REGISTRY_PULL_MIRRORS", "")) if m]
    return [_parse_mirror(m, insecure) for m in mirrors or ()]


# -- one way in: what every public function checks, opens and closes ---------------------


def _reference(reference: Any) -> Reference:
    """A Reference, from one or from text: a registry reference, or a local source ``oci:DIR[:NAME]``."""
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, str) and reference.startswith("oci:"):
        directory, name = parse_layout_source(reference)
        return _LayoutReference(registry="oci:" + os.path.abspath(directory), repository="image", tag=name)
    if isinstance(reference, str) and reference.startswith("docker-archive:"):
        path, name = parse_archive_source(reference)
        return _ArchiveReference(registry="docker-archive:" + os.path.abspath(path), repository="image", tag=name)
    return parse_reference(reference)


def _platform(platform: Any) -> Platform:
    """A Platform from a Platform or a --platform string; None means this machine's."""
    if platform is None:
        return host_platform()
    return platform if isinstance(platform, Platform) else parse_platform(platform)


def _check_jobs(jobs: Any) -> int:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= MAX_JOBS:
        raise UsageError("jobs must be between 1 and %d, not %r" % (MAX_JOBS, jobs))
    return jobs


class _Session:
    """What one public call opens and closes: the store (``store``: "write", made if absent;
    "read", an existing one, written if it can be, never made; "named", read only, and only
    when ``home`` is named),
    the connection pool that its clients share, and the caller's cancellation and deadline.
    ``with _Session(...) as s:`` closes the pool's connections at the end."""

    def __init__(self, home: Optional[str], *, insecure: bool = False, ca_file: Optional[str] = None,
                 username: Optional[str] = None, password: Optional[str] = None, cancel: Any = None,
                 timeout: Optional[float] = None, store: str = "write", cert_dir: Optional[str] = None) -> None:
        if timeout is not None and not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                                        and timeout > 0):
            raise UsageError("timeout must be a positive number of seconds, not %r" % (timeout,))
        self.insecure, self.ca_file, self.cert_dir = insecure, ca_file, cert_dir
        self.username, self.password = username, password
        self.for_registry: Optional[str] = None  # the one registry --username and --cert-dir are for
        self.cancel, self.timeout = cancel, timeout
        self.deadline = time.monotonic() + timeout if timeout else None
        path = home or default_home()
        self.store: Optional[_Store] = None
        if store == "write":
            self.store = _Store(path)
        elif store == "read" and os.path.isdir(path):
            try:  # an existing store keeps what is shown; one that cannot be written is only read
                self.store = _Store(path)
            except StorageError:
                self.store = _Store(path, writable=False)
        elif store == "named" and home and os.path.isdir(os.path.join(path, "blobs")):
            self.store = _Store(path, writable=False)
        if self.store is not None:
            self.store.keep_open()
        self.pool = _Pool()
        self.layouts: List[Any] = []  # local sources opened (layouts, archives), closed with the session
        self.clients: Dict[Tuple[str, str, str], _Client] = {}

    def __enter__(self) -> "_Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.pool.requests:  # (-v) what the round trips were: the first thing a slow link shows
            log.info("%d request%s, %d new connection%s", self.pool.requests, "s" * (self.pool.requests != 1),
                     self.pool.opened, "s" * (self.pool.opened != 1))
        self.pool.close()
        if self.store is not None:
            self.store.close()
        for layout in self.layouts:
            layout.close()
        self.layouts = []

    def attempt(self) -> _Cancel:
        """A new attempt's cancellation (a failed one stops only its own downloads)."""
        return _Cancel(self.cancel, self.deadline, self.timeout)

    def must_stop(self) -> bool:
        """Has the caller cancelled, or the deadline passed?"""
        return bool(self.cancel is not None and self.cancel.is_set()) or \
            (self.deadline is not None and time.monotonic() >= self.deadline)

    def credentials(self, ref: Reference) -> Optional[Credentials]:
        """The caller's credentials if given (for ``for_registry`` alone, when it is set: they are
        never sent to another registry of the same command), else those of the Podman/Docker files."""
        if isinstance(ref, (_LayoutReference, _ArchiveReference)):
            return None
        given = self.username is not None or self.password is not None
        if given and (self.for_registry is None or ref.registry == self.for_registry):
            return Credentials(self.username or "", self.password or "", source="arguments")
        return find_credentials(ref.registry, repository=ref.repository)

    def client(self, ref: Reference, credentials: Optional[Credentials] = None) -> _Client:
        """A client for ``ref``'s registry, starting from what the store remembers of the host;
        one per registry and credentials for the session (several references share its tokens),
        each use with a cancellation of its own."""
        creds = credentials if credentials is not None else self.credentials(ref)
        key = (ref.registry, creds.source if creds else "", creds.username if creds else "")
        client = self.clients.get(key)
        if client is not None:
            client.cancel = self.attempt()
            return client
        mine = self.for_registry is None or ref.registry == self.for_registry
        client = _Client(ref.registry, insecure=self.insecure, ca_file=self.ca_file, cancel=self.attempt(),
                         credentials=creds, pool=self.pool, cert_dir=self.cert_dir if mine else None)
        if self.store is not None:
            client.remembered(self.store.host(client.endpoint))
        self.clients[key] = client
        return client

    def mirror(self, ref: Reference, host: str, scheme: Optional[str]) -> _Client:
        """A client for a mirror: its own credentials, never the upstream's; nothing remembered."""
        return _Client(ref.registry, insecure=self.insecure, ca_file=self.ca_file, endpoint=host, scheme=scheme,
                       cancel=self.attempt(), mirror=True, pool=self.pool,
                       credentials=find_credentials(host, repository=ref.repository))

    def repository(self, ref: Reference) -> Any:
        """Where ``ref``'s documents come from: its registry, or a local layout (``oci:``)."""
        if isinstance(ref, (_LayoutReference, _ArchiveReference)):
            client = _Client("localhost", cancel=self.attempt(), pool=self.pool)
            local: Any = _LayoutRepository(client, ref.registry[4:], ref.tag) if isinstance(ref, _LayoutReference) \
                else _ArchiveRepository(client, ref.registry[len("docker-archive:"):], ref.tag)
            self.layouts.append(local)
            return local
        return _Repository(self.client(ref), ref.repository)

    def stored(self) -> _Store:
        assert self.store is not None
        return self.store


# -- pulls ------------------------------------------------------------------------------


def pull(
    reference: Any,
    *,
    home: Optional[str] = None,
    platform: Any = None,
    jobs: int = JOBS,
    progress: Optional[Callable[[str, int, int], None]] = None,
    insecure: bool = False,
    ca_file: Optional[str] = None, cert_dir: Optional[str] = None,
    username: Optional[str] = None,
    password: Optional[str] = None,
    cancel: Optional[threading.Event] = None,
    oci_layout: Optional[str] = None,
    docker_archive: Optional[str] = None,
    rootfs: Optional[str] = None,
    mirrors: Optional[List[str]] = None,
    timeout: Optional[float] = None,
    overwrite: bool = False,
    output: Optional[str] = None,
    tar: Any = None,
    owners: Optional[str] = None,
    verify_keys: Optional[List[Union[str, bytes]]] = None,
    signed_identity: Optional[str] = None,
    referrers: bool = False,
    offline: bool = False,
) -> PullResult:
    """Pull ``reference`` into the store at ``home`` and return a :class:`PullResult`.

    Parameters (all but ``reference`` keyword-only):

    - ``reference``: a string (``[REGISTRY/]PATH[:TAG][@DIGEST]``, docker.io by default) or a
      :class:`Reference`.
    - ``home``: the store directory (default :func:`default_home`).
    - ``platform``: a :class:`Platform` or a string as ``--platform`` takes it (default
      :func:`host_platform`).
    - ``jobs``: parallel blob downloads, 1 to 32 (default JOBS, 6).
    - ``progress``: ``progress(digest, bytes_done, bytes_total)``, called from download threads.
    - ``insecure``: allow plain HTTP and unverified TLS for this registry (loopback registries
      may use plain HTTP anyway).
    - ``ca_file``: an extra trusted CA bundle (a private CA); SSL_CERT_FILE is honoured too.
    - ``cert_dir``: the registry's certificate directory (``*.crt`` CAs, a ``NAME.cert`` +
      ``NAME.key`` client pair), instead of looking in $XDG_CONFIG_HOME/containers/certs.d,
      /etc/containers/certs.d and /etc/docker/certs.d for a HOST[:PORT] directory.
    - ``username``/``password``: credentials; without them the Podman/Docker files are read.
    - ``cancel``: a :class:`threading.Event`; set it (from another thread) to stop the pull,
      which then raises :class:`Interrupted`. The pull never sets it itself.
    - ``oci_layout`` (``"DIR[:NAME]"``), ``docker_archive`` (a ``docker save`` tar path) and
      ``rootfs`` (a directory that does not exist or is empty): outputs, each written only once
      the image is verified (the rootfs is extracted while layers arrive, and put in place last).
    - ``mirrors``: URLs tried in order before the registry (default for docker.io:
      $REGISTRY_PULL_MIRRORS, comma- or space-separated).
    - ``timeout``: seconds the whole pull may take, else :class:`RegistryError`.
    - ``overwrite``: replace an existing ``docker_archive`` file (refused otherwise).
    - ``tar``: the final tree as one tar (a path, ``-`` for standard output, or a binary file
      object), streamed from the layers: see :func:`export_tar`.
    - ``owners``: the rootfs's ownership: "image" (root's default: the image's owners), "self"
      (a normal user's default: every file the caller's), or "xattr" (the image's owner, mode
      and type recorded in ``user.containers.override_stat``, as containers/storage writes it for
      fuse-overlayfs; FIFOs and device nodes become empty files carrying theirs).
    - ``output``: a directory to write each layer with an ``org.opencontainers.image.title``
      into, as a file of that name (artifacts, as ``oras pull`` does).
    - ``verify_keys``: PEM ECDSA P-256 public keys (cosign's): the image, or its index, must be
      signed by one of them (cosign simple signing or a sigstore bundle) for the repository
      named (``signed_identity``: another repository name to accept), else SignatureError
      before any blob is fetched.
    - ``offline``: answer from the store alone, sending nothing: a tag resolves to the document
      recorded for it and the platform is chosen from there; every output works; what the
      store lacks is NotFound.
    - ``referrers``: also fetch what refers to the image and its index (signatures, SBOMs,
      attestations; and what refers to those, 3 levels deep) into the store, kept with the
      image, and into ``oci_layout`` (each a descriptor with its ``artifactType``; a cosign tag's
      named by its tag).

    Raises a :class:`PullError` subclass on failure (its ``exit_code`` is the CLI's); nothing is
    recorded for a failed pull.
    """
    ref = _reference(reference)
    opts = _PullOptions(_platform(platform), _check_jobs(jobs), progress, mirrors, insecure, verify_keys,
                        signed_identity, referrers, offline)
    session = _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                       password=password, cancel=cancel, timeout=timeout)
    _check_outputs(oci_layout, docker_archive, overwrite)  # refused before anything is downloaded
    job = _RootfsJob(rootfs, owners) if rootfs is not None else None
    store = session.stored()
    # The store's shared lock, from the first request until the outputs are written: a
    # concurrent collect_garbage() never deletes a blob this pull is about to use.
    with store.shared(session.attempt()):
        with session:  # one pool for the whole pull: registry, token service, blob CDN, mirrors
            result, found, paths = _pull_one(session, ref, opts, job)
        outputs = _write_outputs(result, oci_layout, docker_archive, job, overwrite, session.attempt())
        if found and oci_layout is not None:
            _export_blobs(paths, _split_layout_arg(oci_layout, "latest")[0], [_descriptor_entry(d) for _, d in found],
                          session.attempt())
        if output is not None:
            export_files(result, output)
            outputs.append(("output", os.path.abspath(output)))
        if tar is not None:
            outputs.append(("tar", export_tar(result, tar)))
    return result.replace(outputs=tuple(outputs))


def pull_many(references: List[Any], *, home: Optional[str] = None, platform: Any = None, jobs: int = JOBS,
              progress: Optional[Callable[[str, int, int], None]] = None, insecure: bool = False,
              ca_file: Optional[str] = None, cert_dir: Optional[str] = None, username: Optional[str] = None,
              password: Optional[str] = None, cancel: Optional[threading.Event] = None,
              oci_layout: Optional[str] = None, docker_archive: Optional[str] = None,
              mirrors: Optional[List[str]] = None, timeout: Optional[float] = None, overwrite: bool = False,
              verify_keys: Optional[List[Union[str, bytes]]] = None, signed_identity: Optional[str] = None,
              referrers: bool = False, offline: bool = False) -> List[Union[PullResult, PullError]]:
    """Pull several references in one run, sharing connections, tokens and blobs (each blob is
    fetched once): every one is tried, in order, and its PullResult or its PullError returned in
    that order. ``oci_layout`` (a DIR: each image is named by its normalised reference) and
    ``docker_archive`` (as ``docker save a b``) hold every image pulled; other parameters as
    pull() (``--rootfs`` takes one reference: use pull())."""
    refs = [_reference(r) for r in references]
    if not refs:
        raise UsageError("no reference to pull")
    registries = set(r.registry for r in refs if not isinstance(r, (_LayoutReference, _ArchiveReference)))
    if len(registries) > 1 and (username is not None or password is not None or cert_dir is not None):
        raise UsageError("--username and --cert-dir are for one registry, and these references name %d: %s"
                         % (len(registries), ", ".join(sorted(registries))))
    if oci_layout is not None and _split_layout_arg(oci_layout, "-")[1] != "-":
        raise UsageError("with several references the layout is a DIR (each image is named by its reference), "
                         "not DIR:NAME")
    opts = _PullOptions(_platform(platform), _check_jobs(jobs), progress, mirrors, insecure, verify_keys,
                        signed_identity, referrers, offline)
    session = _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                       password=password, cancel=cancel, timeout=timeout)
    _check_outputs(oci_layout, docker_archive, overwrite)
    store = session.stored()
    results: List[Union[PullResult, PullError]] = []
    with store.shared(session.attempt()):
        with session:
            for ref in refs:
                try:
                    results.append(_pull_one(session, ref, opts)[0])
                except PullError as e:
                    if isinstance(e, Interrupted) or session.must_stop():
                        raise
                    log.warning("%s: %s", ref, e)
                    results.append(e)
        # A reference given twice is one image of the layout and the archive (each name once).
        pulled = list(dict((r.reference, r) for r in results if isinstance(r, PullResult)).values())
        if oci_layout is not None and pulled:
            _export_blobs([p for r in pulled for p in r.blob_paths()], oci_layout,
                          [_result_entry(r, r.reference) for r in pulled], session.attempt())
        if docker_archive is not None and pulled:
            _docker_archive(pulled, docker_archive, overwrite)
    return results


def _references_from(path: str) -> List[str]:
    """One reference per line of ``path`` ("-": standard input); blank lines and # comments ignored."""
    limit = 16 * 1024 * 1024
    try:
        if path == "-":
            text = sys.stdin.read(limit + 1)
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read(limit + 1)
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError("cannot read --from-file %s: %s" % (path, getattr(e, "strerror", None) or e)) from None
    if len(text) > limit:  # cut, its last line could name another image
        raise UsageError("--from-file %s is longer than %d characters: refused" % (path, limit))
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


class _PullOptions:
    """What a pull of each reference is asked for (pull() and pull_many() share it)."""

    def __init__(self, want: Platform, jobs: int, progress: Any, mirrors: Optional[List[str]], insecure: bool,
                 verify_keys: Any, signed_identity: Optional[str], referrers: bool, offline: bool) -> None:
        self.want, self.jobs, self.progress, self.mirrors, self.insecure = want, jobs, progress, mirrors, insecure
        self.keys, self.signed_identity = _load_keys(verify_keys), signed_identity
        self.referrers, self.offline = referrers, offline
        if offline and (referrers or mirrors):
            raise UsageError("--offline sends nothing: --referrers and --mirror need a registry")


def _check_outputs(oci_layout: Optional[str], docker_archive: Optional[str], overwrite: bool) -> None:
    if oci_layout is not None:
        _split_layout_arg(oci_layout, "latest")
    if docker_archive is not None:
        _check_archive_target(docker_archive, overwrite)


def _pull_one(session: _Session, ref: Reference, opts: _PullOptions, job: Optional[_RootfsJob] = None
              ) -> Tuple[PullResult, List[Tuple[str, Descriptor]], List[str]]:
    """One reference into the store: from the store alone (offline), a local layout, or its
    mirrors and registry; then its referrers if asked. (result, referrers, their blob paths)."""
    store = session.stored()

    def attempt(client: _Client) -> PullResult:
        puller = _Puller(client, store, ref, opts.want, opts.jobs, opts.progress, job)
        if opts.offline:
            puller.repo = _StoreRepository(client, store, ref)
        elif isinstance(ref, (_LayoutReference, _ArchiveReference)):
            puller.repo = session.repository(ref)
        if opts.keys:
            puller.signatures = _SignatureCheck(puller.repo, opts.keys, opts.signed_identity or ref.name)
        return puller.run()
    if opts.offline or isinstance(ref, (_LayoutReference, _ArchiveReference)):
        result = attempt(_Client("localhost", cancel=session.attempt(), pool=session.pool))
    else:
        try:
            result = _from_mirrors(session, ref, _mirrors_for(ref, opts.mirrors, opts.insecure), attempt) or \
                attempt(session.client(ref))
        except RegistryError as e:
            if store.knows(str(ref)) and not session.must_stop():
                raise RegistryError("%s; the store holds %s: --offline serves it from there" % (e, ref)) from None
            raise
    found: List[Tuple[str, Descriptor]] = []
    paths: List[str] = []
    if opts.referrers:
        found, paths = _pull_referrers(session.repository(ref), store, ref,
                                       [result.index_digest, result.manifest_digest], opts.progress)
        store.record_referrers(result.reference, str(result.platform), found)
    return result, found, paths


def _from_mirrors(session: _Session, ref: Reference, mirrors: List[Tuple[str, Optional[str]]],
                  attempt: Callable[[_Client], PullResult]) -> Optional[PullResult]:
    """As Docker's registry-mirrors: each mirror in turn (None when every one failed, and the
    registry itself is next). A mirror that cannot be reached is skipped at once."""
    for host, scheme in mirrors:
        try:
            return attempt(session.mirror(ref, host, scheme))
        except (RegistryError, NotFound, AuthError, IntegrityError, UnsupportedError) as e:
            if session.must_stop():
                raise
            log.warning("mirror %s failed (%s); trying the next", host, e)
    return None


MAX_REFERRERS = 1000  # what --referrers fetches for one image, at most


def _pull_referrers(repo: _Repository, store: _Store, ref: Reference, subjects: List[Optional[str]],
                    progress: Any, depth: int = 3) -> Tuple[List[Tuple[str, Descriptor]], List[str]]:
    """What refers to ``subjects`` (and to those referrers, ``depth`` levels in all), fetched and
    verified into the store: [(subject, descriptor)] and the paths of every blob."""
    found: List[Tuple[str, Descriptor]] = []
    paths: List[str] = []
    seen: Set[str] = set()
    todo = [(s, 1) for s in dict.fromkeys(s for s in subjects if s)]
    while todo:
        subject, level = todo.pop(0)
        for d in _all_referrers(repo, subject):
            if d.digest in seen:
                continue
            seen.add(d.digest)
            if len(seen) > MAX_REFERRERS:
                raise IntegrityError("%s: more than %d referrers: refused" % (ref, MAX_REFERRERS))
            paths += _fetch_artifact(repo, store, ref, d, progress)
            found.append((subject, d))
            if level < depth:
                todo.append((d.digest, level + 1))
    if found:
        log.info("%s: %d referrers pulled", ref, len(found))
    return found, paths


def _descriptor_entry(d: Descriptor) -> Dict[str, Any]:
    """An index.json entry for a descriptor, as the registry gave it (artifactType, annotations)."""
    entry: Dict[str, Any] = {"mediaType": d.media_type, "digest": d.digest, "size": d.size}
    if d.artifact_type:
        entry["artifactType"] = d.artifact_type
    if d.annotations:
        entry["annotations"] = dict(d.annotations)
    return entry


def _write_outputs(result: PullResult, oci_layout: Optional[str], docker_archive: Optional[str],
                   job: Optional[_RootfsJob], overwrite: bool = False,
                   cancel: Optional[_Cancel] = None) -> List[Tuple[str, str]]:
    """The pull's outputs, now that the image is verified; the rootfs is put in place last."""
    outputs = []
    if result.artifact_type is not None and (docker_archive is not None or job is not None):
        raise UnsupportedError("%s is not a container image (%s): a docker archive or a rootfs needs one"
                               % (result.reference, _printable(result.artifact_type, 100)))
    try:
        if oci_layout is not None:
            outputs.append(("oci_layout", os.path.abspath(_export_layout(result, oci_layout, cancel))))
        if docker_archive is not None:
            outputs.append(("docker_archive", os.path.abspath(export_docker_archive(result, docker_archive,
                                                                                    overwrite))))
        if job is not None:
            outputs.append(("rootfs", job.commit()))
    except BaseException:
        if job is not None:
            job.discard()
        raise
    return outputs


def pull_platforms(reference: Any, platforms: Any = "all", *, home: Optional[str] = None, jobs: int = JOBS,
                   progress: Any = None, insecure: bool = False, ca_file: Optional[str] = None,
                   cert_dir: Optional[str] = None,
                   username: Optional[str] = None, password: Optional[str] = None,
                   cancel: Optional[threading.Event] = None, oci_layout: Optional[str] = None,
                   timeout: Optional[float] = None, verify_keys: Optional[List[Union[str, bytes]]] = None,
                   signed_identity: Optional[str] = None) -> Tuple[str, List[PullResult]]:
    """Pull several platforms of an index (repeated ``--platform``, or ``--platform all``).

    ``platforms`` is ``"all"`` (every manifest the index lists, attestation manifests included:
    an ``oci_layout`` then gets the registry's index byte for byte, as ``skopeo copy --all``
    writes it) or a list of platforms (the best entry for each, attestations skipped; the
    layout gets a new index listing what was pulled). Other parameters as :func:`pull`.
    Returns (the digest of the index written to the layout or, without one, the registry's;
    a PullResult per image pulled). Each image is recorded as (reference, platform).
    ``verify_keys``/``signed_identity`` as for pull(): the index must be signed, or else every
    image taken from it, before any blob is fetched.
    """
    ref, jobs, keys = _reference(reference), _check_jobs(jobs), _load_keys(verify_keys)
    wants = None if platforms == "all" else [_platform(p) for p in platforms]
    if oci_layout is not None:
        _split_layout_arg(oci_layout, "latest")
    session = _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                       password=password,
                       cancel=cancel, timeout=timeout)
    store = session.stored()
    results: List[PullResult] = []
    with store.shared(session.attempt()):
        with session:
            repo = session.repository(ref)
            top_digest, top_data, top = _fetch_manifest(repo, store, ref, ref.ref, set())
            if not top.is_index:
                raise UsageError("%s is a single image, not an index: several platforms need an index" % ref)
            chosen = list(range(len(top.manifests)))
            if wants is not None:
                chosen = []
                for want in wants:
                    i = top.manifests.index(select_platform(list(top.manifests), want, str(ref)))
                    if i not in chosen:
                        chosen.append(i)
            blobs = [store.path(top_digest)]
            entries = [top.manifests[i] for i in chosen]
            if keys:
                check = _SignatureCheck(repo, keys, signed_identity or ref.name)
                if not check.signed(top_digest):
                    for d in entries:
                        if not (_is_attestation(d) or d.media_type in INDEX_TYPES):
                            check.require("%s (%s)" % (ref, d.platform or d.digest), [top_digest, d.digest])
            _pull_entries(repo, store, ref, (top_digest, top), entries, jobs, progress, results, blobs, 1)
        index_digest, index_data = top_digest, top_data
        if wants is not None:
            raw_entries = top.doc.get("manifests") or []
            doc = {"schemaVersion": 2, "mediaType": top.media_type, "manifests": [raw_entries[i] for i in chosen]}
            index_data = json.dumps(doc, indent=2).encode() + b"\n"
            index_digest = _hash("sha256", index_data)
            store.put(index_digest, index_data)
            blobs[0] = store.path(index_digest)
        if oci_layout is not None:
            directory, name = _split_layout_arg(oci_layout, ref.tag or "latest")
            entry = {"mediaType": top.media_type, "digest": index_digest, "size": len(index_data),
                     "annotations": {_REF_NAME: name}}
            _export_blobs(blobs, directory, [entry], session.attempt())
    return index_digest, results


def _pull_entries(repo: Any, store: _Store, ref: Reference, index: Tuple[str, Manifest],
                  entries: List[Descriptor], jobs: int, progress: Any, results: List[PullResult], blobs: List[str],
                  depth: int) -> None:
    """Each entry of an index by its own digest (two entries for one platform, e.g. gzip and
    zstd variants, are both pulled) from ``repo`` (a registry's, or a local source): images into
    ``results``, every blob (nested indexes, attestations) into ``blobs``."""
    for d in entries:
        if d.media_type in INDEX_TYPES:
            if depth >= 4:
                raise IntegrityError("%s: indexes nested more than 4 deep" % ref)
            digest, _, nested = _fetch_manifest(repo, store, ref, d.digest, set())
            blobs.append(store.path(digest))
            _pull_entries(repo, store, ref, index, list(nested.manifests), jobs, progress, results, blobs,
                          depth + 1)
        elif _is_attestation(d) or d.platform is None or d.platform.architecture in ("", "unknown"):
            blobs += _fetch_artifact(repo, store, ref, d, progress)
        else:
            puller = _Puller(repo.client, store, ref, d.platform, jobs, progress, start=(d.digest, index))
            puller.repo = repo
            res = puller.run()
            results.append(res)
            blobs += res.blob_paths()


def _is_attestation(desc: Descriptor) -> bool:
    return bool(desc.annotations and desc.annotations.get(_ANNOTATION_REF_TYPE) == "attestation-manifest")


def _fetch_manifest(repo: _Repository, store: Optional[_Store], ref: Reference, ref_or_digest: str,
                    seen: Set[str], keep: bool = True) -> Tuple[str, bytes, Manifest]:
    """(digest, bytes, parsed) for a tag or digest of ``ref``'s repository, stored: the store
    answers digests it has, and a tag it has pulled before costs one HEAD when unchanged
    (without a store, or with ``keep`` False: nothing is kept)."""
    is_digest = ref_or_digest.startswith(tuple(a + ":" for a in _DIGEST_HEX))
    what = "%s@%s" % (ref.name, ref_or_digest) if is_digest else str(ref)
    if ref_or_digest in seen:
        raise IntegrityError("%s refers to itself" % what)
    seen.add(ref_or_digest)
    if is_digest and store is not None:
        stored = store.read(ref_or_digest)
        if stored is not None:
            return ref_or_digest, stored, parse_manifest(stored, "", what)
    # A warm re-pull asks only a HEAD: the digest says whether anything changed. On a cold
    # store there is nothing to confirm: the GET is the first request.
    warm = store is not None and not is_digest and store.knows(str(ref))
    digest, data, content_type = repo.manifest(ref_or_digest, what=what,
                                               head_first=store.read if store is not None and warm else None)
    parsed = parse_manifest(data, content_type, what)
    if store is not None and keep:
        store.put(digest, data)
    return digest, data, parsed


def _fetch_artifact(repo: _Repository, store: _Store, ref: Reference, desc: Descriptor,
                    progress: Any) -> List[str]:
    """A manifest that is no image (an attestation: in-toto layers), fetched and verified blob
    by blob as it is, for a complete layout; returns the paths of its blobs."""
    data = store.read(desc.digest)
    if data is None:
        _, data, _ = repo.manifest(desc.digest, accept=MANIFEST_ACCEPT + ", " + desc.media_type,
                                   what="%s@%s" % (ref.name, desc.digest))
        store.put(desc.digest, data)
    doc = _loads_json(data, "manifest %s" % desc.digest)
    layers = doc.get("layers")
    parts = [doc.get("config")] + (layers if isinstance(layers, list) else [])
    descs = [Descriptor.parse(p, "blob of %s" % desc.digest) for p in parts if p is not None]
    downloader = _Downloader(repo, store, progress)
    return [store.path(desc.digest)] + [downloader.fetch(d, "blob") for d in descs]


class _Puller:
    """One image pull from one registry (or mirror): manifests down to the chosen platform, the
    blobs in parallel (feeding the rootfs extraction as each lands), then the rows."""

    def __init__(self, client: _Client, store: _Store, ref: Reference, want: Platform, jobs: int, progress: Any,
                 rootfs: Optional[_RootfsJob] = None, start: Optional[Tuple[str, Tuple[str, Manifest]]] = None,
                 signatures: Optional[_SignatureCheck] = None) -> None:
        """``start``: (a manifest's digest, (the digest and document of the index listing it)),
        to pull that entry itself rather than the one the platform rules choose; ``signatures``:
        the image (or its index) must be signed, checked before any blob is fetched."""
        self.client, self.store, self.ref, self.want = client, store, ref, want
        self.start, self.signatures = start, signatures
        self.repo: Any = _Repository(client, ref.repository)
        self.jobs, self.progress, self.rootfs = jobs, progress, rootfs
        self._fetched = threading.Condition()  # notified as each blob lands in the store
        self._failed = self._fetched_all = False

    def _ready(self, blob: LayerResult) -> None:
        """Block until ``blob`` is verified in the store (the rootfs extraction follows the downloads)."""
        with self._fetched:
            while not self.store.has(blob.digest, blob.size):
                if self._failed or self._fetched_all:
                    raise Interrupted("interrupted")
                self.client.cancel.check()
                self._fetched.wait(0.25)

    def run(self) -> PullResult:
        try:
            return self._run()
        except BaseException:
            self._failed = True
            if self.rootfs is not None:
                self.rootfs.discard()
            raise

    def _run(self) -> PullResult:
        ref, store = self.ref, self.store
        seen: Set[str] = set()
        index_digest, index = None, None
        platform_match = ""
        added = store.added
        if not ref.digest and not self.client.mirror and not store.knows(str(ref)):
            # A cold pull (from the registry: a mirror may be dead): blobs are coming. Their
            # connections' handshakes overlap the manifest requests, once the scheme is known.
            self.client.preconnect(self.jobs - 1)
        if self.start is not None:
            (index_digest, index), platform_match = self.start[1], "exact"
            digest, data, manifest = _fetch_manifest(self.repo, store, ref, self.start[0], seen)
        else:
            digest, data, manifest = _fetch_manifest(self.repo, store, ref, ref.ref, seen)
        depth = 0
        while manifest.is_index:
            depth += 1
            if depth > 4:
                raise IntegrityError("%s: indexes nested more than 4 deep" % ref)
            if index is None:
                index_digest, index = digest, manifest
            chosen, how = _choose_platform(list(manifest.manifests), self.want, str(ref))
            if how != "exact":
                log.info("%s: chose the %s entry %s: %s", ref, chosen.platform or "platform-less", chosen.digest, how)
            platform_match = platform_match or how
            digest, data, manifest = _fetch_manifest(self.repo, store, ref, chosen.digest, seen)
        config, layers = manifest.config, list(manifest.layers)
        assert config is not None
        if self.signatures is not None:
            self.signatures.require(str(ref), ([index_digest] if index_digest else []) + [digest])
        if not manifest.is_image and self.rootfs is not None:
            raise UnsupportedError("%s is not a container image (%s): it has no root file system to extract"
                                   % (ref, _printable(manifest.artifact_type or "", 100)))

        def mk(d: Descriptor) -> LayerResult:
            return LayerResult(d.digest, d.media_type, d.size, store.path(d.digest))

        if self.rootfs is not None:  # extraction follows the downloads, layer by layer
            self.rootfs.start(str(ref), mk(config), tuple(mk(d) for d in layers), self._ready)
        downloader = _Downloader(self.repo, store, self.progress)
        unique = list(dict((d.digest, d) for d in [config] + layers).values())
        self._fetch_all(downloader, unique, config)
        with self._fetched:
            self._fetched_all = True
            self._fetched.notify_all()
        if self.rootfs is not None:
            self.rootfs.wait(self.client.cancel)

        if manifest.is_image:
            config_doc = _loads_json(store.read(config.digest) or b"", "config")
            rootfs = config_doc.get("rootfs")
            diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
            if isinstance(diff_ids, list) and len(diff_ids) != len(layers):
                raise IntegrityError("%s: the manifest has %d layers but the config lists %d diff_ids"
                                     % (ref, len(layers), len(diff_ids)))
            plat = _config_platform(config_doc, self.want)
        else:  # an artifact's config is whatever its type says (often {}): kept, not read
            config_doc, plat = {}, Platform("", "")
            platform_match = platform_match or "an artifact (no platform)"
        if index is None and plat.architecture:
            platform_match = self._single_image_match(plat, digest)
        result = PullResult(
            reference=str(ref), manifest_digest=digest, manifest_media_type=manifest.media_type,
            index_digest=index_digest, index_media_type=index.media_type if index else None, platform=plat,
            config=mk(config), layers=tuple(mk(d) for d in layers), home=store.home,
            manifest_size=len(data), downloaded_bytes=downloader.fetched_bytes, platform_match=platform_match,
            artifact_type=manifest.artifact_type,
        )
        touched = store.touch(str(ref), digest)
        recorded = touched or store.record(result, index.doc if index else None, manifest.doc, config_doc)
        if recorded and self.client.scheme is not None:
            store.remember_host(self.client.endpoint, self.client.scheme, self.client.auth.challenge)
        if recorded and not (touched and store.added == added and not downloader.fetched_bytes):
            store.write_index(str(ref))  # else its image, documents and blobs were all there: index.json says so
        elif not _have_sqlite():
            log.warning("this Python has no sqlite3 module: blobs are stored but no metadata was recorded")
        return result.replace(recorded=recorded)

    def _single_image_match(self, plat: Platform, digest: str) -> str:
        """How a reference that names one image (no index) matches the platform wanted."""
        ref, want = self.ref, self.want
        if _runs_on(plat, want):
            return "exact" if plat.normalized() == want.normalized() else "compatible (%s runs on %s)" % (plat, want)
        if ref.digest:  # pinned by digest: taken as it is, but said
            log.warning("%s is an image for %s, not %s", ref, plat, want)
            return "pinned by digest (%s does not run on %s)" % (plat, want)
        # As docker: the image "does not match the specified platform".
        raise NoMatchingPlatform(str(ref), str(want), [str(plat)],
                                 hint="pull it by digest (%s@%s) to take it anyway" % (ref.name, digest))

    def _fetch_all(self, downloader, descs, config):
        # The config first (small, and the rootfs extraction needs it), then the largest first:
        # the longest downloads start at once and the pool drains evenly.
        missing = sorted((d for d in descs if not self.store.has(d.digest, d.size)),
                         key=lambda d: (d is not config, -d.size))
        if self.progress:
            absent = set(map(id, missing))
            for d in descs:
                if id(d) not in absent:
                    self.progress(d.digest, d.size, d.size)

        def fetch(d):
            try:
                downloader.fetch(d, "config" if d is config else "layer")
            except BaseException:
                self._failed = True
                raise
            finally:
                with self._fetched:  # wakes the rootfs extraction waiting in _ready
                    self._fetched.notify_all()
        if missing:
            _in_parallel(fetch, missing, self.jobs, self.client.cancel)


def _have_sqlite() -> bool:
    try:
        import sqlite3  # noqa: F401
    except ImportError:
        return False
    return True


# -- copy into a registry --------------------------------------------------------------------

CHUNK_SIZE = 32 * 1024 * 1024  # blobs up to this go in one PUT; larger ones in PATCH chunks of it


def _strip_transport(text: Any) -> Any:
    return text[len("docker://"):] if isinstance(text, str) and text.startswith("docker://") else text


def copy(src: Any, dst: Any, *, home: Optional[str] = None, platform: Any = None, all_platforms: bool = False,
         chunk_size: int = CHUNK_SIZE, jobs: int = JOBS, progress: Any = None, insecure: bool = False,
         ca_file: Optional[str] = None, cert_dir: Optional[str] = None, username: Optional[str] = None,
         password: Optional[str] = None, cancel: Optional[threading.Event] = None,
         timeout: Optional[float] = None, referrers: bool = False) -> Dict[str, Any]:
    """Copy ``src`` (a registry reference, ``docker://`` allowed, or ``oci:DIR[:NAME]``) into the
    registry reference ``dst``, as the distribution spec says: the source is pulled into the store
    (every blob verified; ``all_platforms``: the whole index, attestations included, else one
    platform's image), then each blob the destination lacks (HEAD) is mounted from the source
    repository when both are on one registry, else uploaded (one PUT up to ``chunk_size``, else
    PATCH chunks; cuts resumed), then the manifests byte for byte, children first, the top one
    under DST's tag (else the source's). Never re-compressed: every digest is the source's.
    ``username``/``password`` are the destination's; the source's come from the auth files.
    ``referrers``: what refers to the image (signatures, SBOMs) goes along, by digest (a cosign
    tag by its tag); where the destination has no referrers API, its ``sha256-HEX`` referrers
    index is written too, as a client must. Returns {"source", "destination", "digest",
    "uploaded", "mounted", "skipped"} (and "referrers": their digests)."""
    src_ref, dst_ref = _reference(_strip_transport(src)), _reference(_strip_transport(dst))
    if not isinstance(chunk_size, int) or chunk_size < 1024:
        raise UsageError("chunk size must be at least 1024 bytes, not %r" % (chunk_size,))
    # --cert-dir, like --username, is the destination's: the source uses the certs.d lookup.
    kw = dict(home=home, jobs=jobs, progress=progress, insecure=insecure, ca_file=ca_file,
              cert_dir=None if src_ref.registry != dst_ref.registry else cert_dir, cancel=cancel, timeout=timeout)
    if isinstance(dst_ref, (_LayoutReference, _ArchiveReference)):  # a file on this machine: a pull's output
        local = str(dst_ref)[len("oci:"):] if isinstance(dst_ref, _LayoutReference) else None
        archive = dst_ref.registry[len("docker-archive:"):] if isinstance(dst_ref, _ArchiveReference) else None
        if all_platforms or platform == "all":
            if archive:
                raise UsageError("a docker archive holds one platform's image: not --all")
            top, _ = pull_platforms(src_ref, "all", oci_layout=local, **kw)
        else:
            top = pull(src_ref, platform=platform, oci_layout=local, docker_archive=archive, **kw).manifest_digest
        return dict(source=str(src_ref), destination=str(dst_ref), digest=top, uploaded=[], mounted=[], skipped=[])
    if referrers and (all_platforms or platform == "all"):
        raise UsageError("--referrers copies one platform's image and its index's referrers: not with --all")
    if all_platforms or platform == "all":
        top, _ = pull_platforms(src_ref, "all", **kw)
    else:
        pulled = pull(src_ref, platform=platform, referrers=referrers, **kw)
        top = pulled.manifest_digest
    named = re.search(r"[:@][^/]*$", str(_strip_transport(dst)) if not isinstance(dst, Reference) else str(dst))
    src_tag = src_ref.tag if not isinstance(src_ref, (_LayoutReference, _ArchiveReference)) else None
    if isinstance(src_ref, _ArchiveReference) and src_ref.tag:  # REF of docker-archive:FILE:REF
        try:
            src_tag = parse_reference(src_ref.tag).tag
        except PullError:
            src_tag = None
    tag = (dst_ref.tag if named else None) or src_tag or dst_ref.tag or "latest"
    done: Dict[str, List[str]] = {"uploaded": [], "mounted": [], "skipped": []}
    same = not isinstance(src_ref, _LayoutReference) and src_ref.registry == dst_ref.registry \
        and src_ref.repository != dst_ref.repository
    with _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                  password=password, cancel=cancel, timeout=timeout) as session:
        session.for_registry = dst_ref.registry
        repo = session.repository(dst_ref)
        store = session.stored()
        mount = src_ref.repository if same else None
        _push_tree(store, repo, top, dst_ref.digest or tag, mount, chunk_size, done, set(), 0, jobs)
        if referrers:
            done["referrers"] = _push_referrers(store, repo, str(src_ref), mount, chunk_size, done, jobs)
    log.info("copied %s to %s (%s): %d blobs uploaded, %d mounted, %d there already", src_ref, dst_ref, top,
             len(done["uploaded"]), len(done["mounted"]), len(done["skipped"]))
    return dict(source=str(src_ref), destination=str(dst_ref), digest=top, **done)


def _push_referrers(store: _Store, repo: _Repository, reference: str, mount_from: Optional[str], chunk_size: int,
                    done: Dict[str, List[str]], jobs: int = JOBS) -> List[str]:
    """Push what was pulled with ``reference`` because it refers to it: each by digest, a cosign
    tag's also by its tag; and, where the destination has no referrers API, the referrers tag
    (``sha256-HEX``: an index of them) for each subject, as a client pushing to such a registry must."""
    rows = store.referrer_rows(reference)
    by_subject: Dict[str, List[Dict[str, Any]]] = {}
    for subject, digest, media_type, artifact_type, tag in rows:
        sent = set(done["skipped"] + done["uploaded"] + done["mounted"])
        _push_tree(store, repo, digest, tag, mount_from, chunk_size, done, sent, 0, jobs)
        if not tag:
            entry: Dict[str, Any] = {"mediaType": media_type, "digest": digest,
                                     "size": len(store.read(digest) or b"")}
            if artifact_type:
                entry["artifactType"] = artifact_type
            by_subject.setdefault(subject, []).append(entry)
    for subject, entries in by_subject.items():
        if repo.referrers(subject) is None:  # no API: the tag schema, what is there kept (the spec's GET, add, PUT)
            tag = subject.replace(":", "-")
            try:
                _, data, content_type = repo.manifest(tag, accept=MT_OCI_INDEX, what="%s:%s" % (repo.name, tag))
                old = parse_manifest(data, content_type, "referrers index %s" % tag)
                if not old.is_index:
                    raise IntegrityError("%s:%s is not a referrers index: left alone" % (repo.name, tag))
                kept = [e for e in _list_at(old.doc, "manifests") if isinstance(e, dict)]
            except NotFound:
                kept = []
            known = set(e.get("digest") for e in kept)
            merged = kept + [e for e in entries if e["digest"] not in known]
            if len(merged) != len(kept):
                index = json.dumps({"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": merged}).encode()
                repo.put_manifest(tag, MT_OCI_INDEX, index)
    return [r[1] for r in rows]


def _push_blob(store: _Store, repo: _Repository, d: Descriptor, mount_from: Optional[str], chunk_size: int,
               done: Dict[str, List[str]]) -> None:
    """One blob to the destination: there already (HEAD), mounted, or uploaded."""
    session = None
    if repo.has_blob(d.digest):
        how = "skipped"
    elif mount_from and (session := repo.start_upload(d.digest, mount_from)) is None:
        how = "mounted"
    else:
        repo.upload(store.path(d.digest), d.digest, d.size, chunk_size, session)
        how = "uploaded"
    done[how].append(d.digest)  # list.append: safe from several threads
    log.info("%s %s", how, d.digest)


def _push_tree(store: _Store, repo: _Repository, digest: str, ref: Optional[str], mount_from: Optional[str],
               chunk_size: int, done: Dict[str, List[str]], seen: Set[str], depth: int, jobs: int = JOBS) -> None:
    """Push the document ``digest`` from the store with everything below it, children first."""
    if depth > 4:
        raise IntegrityError("indexes nested more than 4 deep")
    data = store.read(digest)
    if data is None:
        raise NotFound("%s is not in the store %s" % (digest, store.home))
    manifest = parse_manifest(data, "", digest)
    if manifest.is_index:
        for d in manifest.manifests:
            if d.digest not in seen:
                seen.add(d.digest)
                _push_tree(store, repo, d.digest, None, mount_from, chunk_size, done, seen, depth + 1, jobs)
    else:
        assert manifest.config is not None
        todo = []
        for d in [manifest.config] + list(manifest.layers):
            if d.digest not in seen:
                seen.add(d.digest)
                if not store.has(d.digest, d.size):
                    raise NotFound("%s %s is not in the store %s" % (repo.name, d.digest, store.home))
                todo.append(d)
        _in_parallel(lambda d: _push_blob(store, repo, d, mount_from, chunk_size, done),
                     sorted(todo, key=lambda d: -d.size), jobs, repo.client.cancel)
    repo.put_manifest(ref or digest, manifest.media_type, data)


# --------------------------------------------------------------------------- Inspect, tags and the store


def inspect(reference: Any, *, home: Optional[str] = None, platform: Any = None, insecure: bool = False,
            ca_file: Optional[str] = None,
            cert_dir: Optional[str] = None, username: Optional[str] = None, password: Optional[str] = None,
            timeout: Optional[float] = None) -> Dict[str, Any]:
    """What a pull of ``reference`` would fetch, without fetching a layer (``inspect``).

    Returns one dict with the fields ``skopeo inspect`` prints (``Name``, ``Digest`` (of what the
    reference names: the index for a multi-platform image), ``Created``, ``DockerVersion``,
    ``Labels``, ``Architecture``, ``Os``, ``Variant``, ``Layers``, ``LayersData``, ``Env``) and
    ``ManifestDigest`` (the chosen image's), ``Platform``, ``PlatformMatch``, ``Config``
    (Entrypoint, Cmd, WorkingDir, ExposedPorts, User), ``Size`` (compressed) and, for an index,
    ``Index`` with every platform it offers, its compressed size and which one this host takes.
    Only manifests and the config are fetched (sizes of at most INSPECT_SIZES other platforms),
    and only what is shown (the documents named and the config) is kept, in an existing store
    that can be written: inspect never makes a store and works without a writable HOME.
    ``timeout`` as for pull().
    """
    ref, want = _reference(reference), _platform(platform)
    with _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                  password=password,
                  timeout=timeout, store="read") as session:
        repo = session.repository(ref)
        found = _inspected(repo, session.store, ref, want)
        doc = _inspect_doc(ref, found)
        doc["Referrers"] = [_referrer_doc(d, subject)
                            for subject in dict.fromkeys([found.top, found.digest])
                            for d in _all_referrers(repo, subject)]
    return doc


def _referrer_doc(desc: Descriptor, subject: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {"Subject": subject, "Digest": desc.digest, "MediaType": desc.media_type,
                           "ArtifactType": desc.artifact_type, "Size": desc.size}
    if desc.annotations:
        out["Annotations"] = desc.annotations
        if desc.annotations.get(_REF_NAME):
            out["Tag"] = desc.annotations[_REF_NAME]
    return out


def inspect_raw(reference: Any, *, config: bool = False, platform: Any = None, home: Optional[str] = None,
                insecure: bool = False, ca_file: Optional[str] = None,
                cert_dir: Optional[str] = None, username: Optional[str] = None,
                password: Optional[str] = None, timeout: Optional[float] = None) -> bytes:
    """The manifest (or index) ``reference`` names, byte for byte as served (``inspect --raw``);
    with ``platform``, that platform's manifest from the index; with ``config``, the chosen
    platform's config blob (``inspect --config``). Verified; nothing is stored, no layer fetched."""
    ref = _reference(reference)
    with _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                  password=password,
                  timeout=timeout, store="named") as session:
        repo = session.repository(ref)
        seen: Set[str] = set()
        digest, data, manifest = _fetch_manifest(repo, None, ref, ref.ref, seen)
        depth = 0
        while manifest.is_index and (platform is not None or config):
            depth += 1
            if depth > 4:
                raise IntegrityError("%s: indexes nested more than 4 deep" % ref)
            chosen, _ = _choose_platform(list(manifest.manifests), _platform(platform), str(ref))
            digest, data, manifest = _fetch_manifest(repo, None, ref, chosen.digest, seen)
        if not config:
            return data
        if manifest.config is None:
            raise UnsupportedError("%s is an index without an image for the platform: it has no config" % ref)
        return repo.small_blob(manifest.config, "config")


class _Inspected:
    """What inspect() fetched: the top document's digest, the index entries (for an index), the
    chosen image's digest, how it was chosen, its manifest and its config."""

    def __init__(self, top: str, index: Optional[Dict[str, Any]], digest: str, how: str, manifest: Manifest,
                 config: dict) -> None:
        self.top, self.index, self.digest, self.how = top, index, digest, how
        self.manifest, self.config = manifest, config


def _inspected(repo: _Repository, store: Optional[_Store], ref: Reference, want: Platform) -> _Inspected:
    seen: Set[str] = set()
    top, _, manifest = _fetch_manifest(repo, store, ref, ref.ref, seen)
    index: Optional[Dict[str, Any]] = None
    digest, how = top, "exact"
    if manifest.is_index:
        chosen, how = _choose_platform(list(manifest.manifests), want, str(ref))
        entries, sized = [], 0
        for d in manifest.manifests:
            entry: Dict[str, Any] = {"Digest": d.digest, "MediaType": d.media_type,
                                     "Platform": str(d.platform or ""), "Chosen": d.digest == chosen.digest}
            kind = (d.annotations or {}).get(_ANNOTATION_REF_TYPE)
            if kind:
                entry["Kind"] = kind
            elif d.media_type in MANIFEST_TYPES and sized < INSPECT_SIZES and d.size <= MAX_MANIFEST_BYTES:
                sized += 1
                _, _, m = _fetch_manifest(repo, store, ref, d.digest, set(), keep=False)
                entry["Size"] = sum(x.size for x in m.layers) + (m.config.size if m.config else 0)
            entries.append(entry)
        index = {"Digest": top, "MediaType": manifest.media_type, "Manifests": entries}
        if sized < sum(1 for e in entries if "Kind" not in e and e["MediaType"] in MANIFEST_TYPES):
            index["SizesOmitted"] = "sizes of the first %d platforms only" % INSPECT_SIZES
            log.warning("%s lists more than %d platforms: sizes of the first %d only", ref, INSPECT_SIZES,
                        INSPECT_SIZES)
        digest, _, manifest = _fetch_manifest(repo, store, ref, chosen.digest, seen)
        if manifest.is_index:
            raise UnsupportedError("%s: nested indexes cannot be inspected" % ref)
    assert manifest.config is not None
    data = store.read(manifest.config.digest) if store is not None else None
    if data is None:
        data = repo.small_blob(manifest.config, "config")
        if store is not None:
            store.put(manifest.config.digest, data)
    return _Inspected(top, index, digest, how, manifest, _loads_json(data, "config"))


def _inspect_doc(ref: Reference, found: _Inspected) -> Dict[str, Any]:
    """The skopeo-shaped dict of what inspect() found (its config's fields checked first)."""
    config, manifest = found.config, found.manifest
    assert manifest.config is not None
    cfg = _dict_at(config, "config")
    for key, kind in (("Labels", dict), ("Env", list), ("Entrypoint", list), ("Cmd", list), ("ExposedPorts", dict),
                      ("WorkingDir", str), ("User", str)):
        if cfg.get(key) is not None and not isinstance(cfg.get(key), kind):
            raise IntegrityError("config of %s: %s is not a %s" % (ref, key, kind.__name__))
    out: Dict[str, Any] = {
        "Name": ref.name,
        "Digest": found.top,
        "ManifestDigest": found.digest,
        "Created": config.get("created"),
        "DockerVersion": config.get("docker_version", ""),
        "Labels": cfg.get("Labels"),
        "Architecture": config.get("architecture", ""),
        "Os": config.get("os", ""),
        "Layers": [x.digest for x in manifest.layers],
        "LayersData": [{"MIMEType": x.media_type, "Digest": x.digest, "Size": x.size,
                        "Annotations": x.annotations} for x in manifest.layers],
        "Env": cfg.get("Env"),
        "Platform": str(Platform(str(config.get("os", "")), str(config.get("architecture", "")),
                                 str(config.get("variant") or ""))),
        "PlatformMatch": found.how,
        "Config": dict((k, cfg.get(k)) for k in ("Entrypoint", "Cmd", "WorkingDir", "ExposedPorts", "User")),
        "Size": sum(x.size for x in manifest.layers) + manifest.config.size,
    }
    if config.get("variant"):
        out["Variant"] = config["variant"]
    if found.index is not None:
        out["Index"] = found.index
    return out


def list_tags(reference: Any, *, insecure: bool = False, ca_file: Optional[str] = None, cert_dir: Optional[str] = None,
              username: Optional[str] = None, password: Optional[str] = None, page_size: int = 1000,
              home: Optional[str] = None, timeout: Optional[float] = None) -> List[str]:
    """Every tag of a repository (``tags``), following the registry's pagination (``?n=`` and
    the ``Link`` header, on the registry's own host only) to the end. The store is read (what
    it remembers of the host) only when ``home`` is given; ``timeout`` as for pull()."""
    ref = _reference(reference)
    with _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                  password=password,
                  timeout=timeout, store="named") as session:
        return session.repository(ref).tags(page_size)


def referrers(reference: Any, *, artifact_type: Optional[str] = None, insecure: bool = False,
              ca_file: Optional[str] = None,
              cert_dir: Optional[str] = None, username: Optional[str] = None, password: Optional[str] = None,
              home: Optional[str] = None, timeout: Optional[float] = None) -> List[Descriptor]:
    """What refers to the manifest ``reference`` names (by digest, or by tag: its digest is asked
    first): the OCI 1.1 referrers API (every page) or, where the registry has none, the
    referrers tag schema (``sha256-HEX``), plus cosign's ``sha256-HEX.sig``/``.att``/``.sbom``
    tags (their descriptors carry the tag as ``org.opencontainers.image.ref.name``).
    ``artifact_type`` keeps only those of that type."""
    ref = _reference(reference)
    with _Session(home, insecure=insecure, ca_file=ca_file, cert_dir=cert_dir, username=username,
                  password=password,
                  timeout=timeout, store="named") as session:
        repo = session.repository(ref)
        digest = ref.digest or repo.manifest(ref.ref, what=str(ref))[0]
        found = _all_referrers(repo, digest)
    return [d for d in found if artifact_type is None or d.artifact_type == artifact_type]


def _existing_store(home: Optional[str]) -> Optional[_Store]:
    """The store for a local action (images, rm, gc, verify): never made by it. A named HOME
    that is no store is an error (a typo must not make a directory); the default one, absent,
    just holds nothing yet (None)."""
    path = home or default_home()
    if os.path.isdir(os.path.join(path, "blobs")):
        return _Store(path)
    if home:
        raise NotFound("there is no store at %s (nothing was ever pulled there)" % path)
    return None


def images(*, home: Optional[str] = None) -> List[dict]:
    """What the store holds (``images``): one dict per image (reference, platform, manifest
    digest, size, pulled_at, last_used_at), from sqlite3."""
    store = _existing_store(home)
    return store.images() if store is not None else []


def remove(reference: Any, *, home: Optional[str] = None, platform: Any = None) -> int:
    """Forget an image (``rm``): its rows and its ``index.json`` entry (every platform, or
    only ``platform``). Blobs stay until collect_garbage(). Returns how many images went;
    NotFound when none matched."""
    ref = _reference(reference)
    want = _platform(platform) if platform is not None else None
    store = _existing_store(home)
    n = store.forget(str(ref), want) if store is not None else 0
    if not n:
        raise NotFound("%s%s is not in the store %s" % (ref, " for %s" % want if want else "",
                                                        store.home if store else home or default_home()))
    return n


def collect_garbage(*, home: Optional[str] = None, partial_age: float = 86400.0) -> Tuple[int, int]:
    """Delete blobs no image references, and ``.partial`` files older than ``partial_age``
    seconds that no process holds (``gc``). Safe while other processes pull into the same
    HOME: it holds the store's lock exclusively, which every pull holds shared from its first
    request until its image is recorded. Only regular files are deleted, by name inside the
    store's own directories. Returns (files deleted, bytes freed)."""
    store = _existing_store(home)
    if store is None:
        return 0, 0
    if not _have_sqlite():
        raise UnsupportedError("this Python has no sqlite3 module: without the image list no blob is known unused")
    files = freed = 0
    with store.exclusive(), store.blob_files() as entries:
        store.drop_unused_rows()
        keep = store.referenced()
        now = time.time()
        for digest, name, dir_fd in entries:
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue  # not ours (verify() reports a planted link)
            if digest:
                if digest in keep:
                    continue
            elif name.endswith(".partial") or name.startswith((".tmp-", ".probe-")):
                if now - st.st_mtime < partial_age or not _unlocked(dir_fd, name):
                    continue
            else:
                continue  # not ours: left alone
            _unlink_at(dir_fd, name)
            files += 1
            freed += st.st_size
            log.info("deleted %s (%s)", digest or name, _human(st.st_size))
    return files, freed


def verify(*, home: Optional[str] = None) -> List[Tuple[str, List[str]]]:
    """Hash every blob again (``verify``); remove the corrupt ones (and anything under a digest's
    name that is no regular file: a planted link). Returns [(digest, the references of the
    images it breaks)], empty when all is well (the CLI exits 5 otherwise)."""
    store = _existing_store(home)
    if store is None:
        return []
    bad = []
    with store.exclusive(), store.blob_files() as entries:
        users = store.referenced() if _have_sqlite() else {}
        for digest, name, dir_fd in entries:
            if not digest:
                continue
            h = hashlib.new(digest.split(":")[0])
            try:
                fd = os.open(name, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | getattr(os, "O_NONBLOCK", 0),
                             dir_fd=dir_fd)
                with os.fdopen(fd, "rb") as f:
                    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    for chunk in iter(lambda: f.read(CHUNK), b""):
                        h.update(chunk)
                actual = "%s:%s" % (h.name, h.hexdigest())
            except FileNotFoundError:
                continue
            except OSError as e:  # a link (ELOOP), a directory, a FIFO...: not a blob
                if e.errno not in (errno.ELOOP, errno.EINVAL, errno.EISDIR, errno.ENXIO):
                    raise StorageError("cannot read %s in %s: %s" % (name, store.home, e.strerror or e)) from None
                actual = "not a regular file"
            if actual != digest:
                log.info("%s is corrupt (%s)", digest, actual)
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except IsADirectoryError:
                    os.rmdir(name, dir_fd=dir_fd)
                except OSError:
                    pass
                bad.append((digest, users.get(digest, [])))
    if bad:
        store.write_index()  # an image that lost a blob leaves index.json
    return bad


# --------------------------------------------------------------------------- Command line

_EXIT_CODES = """exit codes:
  0    done (pulled, listed, ...)
  1    anything else (e.g. unsupported manifest or media type)
  2    usage error or malformed reference
  3    authentication or authorization refused
  4    not found: repository, tag, digest, or no image for the platform
  5    integrity: digest or size mismatch, malformed or hostile content
  6    registry unreachable or failing after retries (each request is tried %d times,
       waiting at most ~%ds in all, or %d x Retry-After capped at %ds)
  7    local storage error (unwritable store, disk full)
  130  interrupted (Ctrl-C)
""" % (RETRIES + 1, sum(min(RETRY_MAX, RETRY_BASE * 2 ** i) for i in range(RETRIES)), RETRIES, RETRY_AFTER_MAX)

_VERBS = {
    "pull": "pull an image into the store (the default: `registry_pull REF` pulls REF)",
    "inspect": "show what a pull would fetch: digests, platforms, config; fetches no layer",
    "tags": "list every tag of a repository",
    "images": "list the images in the store",
    "rm": "forget an image (every platform, or --platform's); its blobs stay until gc",
    "gc": "delete blobs no image needs, and .partial files older than a day that no pull holds",
    "verify": "hash every blob again; remove the corrupt ones and name the images they break (exit 5 if any)",
    "copy": "copy an image (or a whole index: --all) from a registry or oci:DIR[:NAME] into a registry",
}
# The options that take a value (to find the verb among the arguments, options may come first).
_VALUED = {"--home", "--platform", "--jobs", "--mirror", "--ca-file", "--cert-dir", "--username", "--oci-layout",
           "--docker-archive", "--rootfs", "--timeout", "--progress", "--password", "-p", "--output",
           "--verify-key", "--signed-identity", "--chunk-size", "--from-file", "--dest-prefix", "--owners", "--tar"}


class _Formatter:
    """One line per message, every character printable: messages quote servers' words (a
    logging formatter: the handler calls its ``format``)."""

    def format(self, record):
        return "registry_pull: " + _printable(record.getMessage(), 2000)


_PARSER_CLASS: List[Any] = []


def _argument_parser(**kw: Any) -> argparse.ArgumentParser:
    """A parser of the command line (argparse is imported here: a library user never needs it)."""
    if not _PARSER_CLASS:
        import argparse

        class _ArgumentParser(argparse.ArgumentParser):
            """argparse without abbreviations (``--password`` is never read as ``--password-stdin``),
            and a usage error in one line, not the whole usage block."""

            def __init__(self, **kw: Any) -> None:
                super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kw)

            def error(self, message: str) -> Any:
                # Never repeat a value the user typed after an option that was not understood: it may be
                # a password (``--pass=s3cret``, ``--password-stdin=s3cret``).
                message = re.sub(r"ignored explicit argument '.*'", "ignored the value given to it", message)
                m = re.match(r"unrecognized arguments: (.*)", message)
                if m:
                    flags = [a.split("=", 1)[0] for a in m.group(1).split() if a.startswith("-")]
                    message = "unrecognized arguments: %s" % (" ".join(flags) or "(values not shown)")
                sys.stderr.write("registry_pull: error: %s (see %s --help)\n" % (_printable(message, 500), self.prog))
                sys.exit(2)
        _PARSER_CLASS.append(_ArgumentParser)
    return _PARSER_CLASS[0](**kw)


def _common_options(p: argparse.ArgumentParser, json_help: str = "print the result as JSON on stdout") -> None:
    p.add_argument("--home", metavar="DIR", help="the store (default $REGISTRY_PULL_HOME, else "
                   "${XDG_DATA_HOME:-~/.local/share}/registry_pull)")
    p.add_argument("--json", action="store_true", help=json_help)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("-v", "--verbose", action="count", default=0, help="say what is happening (-vv: every request)")


def _registry_options(p: argparse.ArgumentParser) -> None:
    import argparse
    p.add_argument("--insecure", action="store_true",
                   help="allow plain HTTP and unverified TLS for this registry (loopback may use HTTP anyway)")
    p.add_argument("--ca-file", metavar="FILE", help="extra trusted CA bundle (besides SSL_CERT_FILE)")
    p.add_argument("--cert-dir", metavar="DIR", help="the registry's certificates: *.crt CAs and a NAME.cert + "
                   "NAME.key client pair (default: certs.d/HOST[:PORT] of $XDG_CONFIG_HOME/containers, "
                   "/etc/containers, /etc/docker)")
    p.add_argument("--username", metavar="USER", help="registry user name (password from --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    # Refused whatever follows it (a password in argv is in the shell history and `ps`).
    p.add_argument("-p", "--password", nargs="?", const="", dest="password_argument", help=argparse.SUPPRESS)
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up (exit 6) when the whole command takes "
                   "longer; without it a stalled transfer is still cut and resumed")


def _platform_option(p: argparse.ArgumentParser, several: bool) -> None:
    extra = ("; repeat it for several platforms of an index, or 'all' for every manifest it lists "
             "(attestations included)") if several else ""
    p.add_argument("--platform", metavar="OS/ARCH[/VARIANT]", action="append",
                   help="default: linux/%s%s" % (host_platform().architecture, extra))


def _pull_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=JOBS, metavar="N", help="parallel blob downloads, 1-%d (default %d)"
                   % (MAX_JOBS, JOBS))
    p.add_argument("--mirror", metavar="URL", action="append",
                   help="a mirror to try before the registry (repeatable, in order); for docker.io the "
                   "default is $REGISTRY_PULL_MIRRORS")
    p.add_argument("--oci-layout", metavar="DIR[:NAME]", help="also write the image into an OCI image layout "
                   "(NAME defaults to the tag; an existing layout gains an entry)")
    p.add_argument("--docker-archive", metavar="FILE", help="also write a `docker save` tar (docker/podman load); "
                   "an existing FILE is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true", help="let --docker-archive replace an existing FILE")
    p.add_argument("--rootfs", metavar="DIR", help="also extract the layers into DIR (must not exist or be empty)")
    p.add_argument("--tar", metavar="FILE", help="also write the final tree as one tar (- for standard output), "
                   "as docker export does: whiteouts applied, owners, modes and xattrs as the image says")
    p.add_argument("--owners", choices=_OWNERS, help="the rootfs's owners: image (root's default), self (a normal "
                   "user's default), xattr (recorded in user.containers.override_stat for fuse-overlayfs)")
    p.add_argument("--offline", action="store_true", help="answer from the store alone, sending nothing (a tag "
                   "resolves to what was recorded for it; every output works from there)")
    p.add_argument("--referrers", action="store_true", help="also fetch what refers to the image (signatures, "
                   "SBOMs, attestations: OCI referrers, the referrers tag, cosign's tags) into the store and "
                   "--oci-layout")
    p.add_argument("--verify-key", metavar="FILE", action="append", help="refuse (exit 8) an image not signed "
                   "by this public key (PEM, ECDSA P-256, as cosign generate-key-pair writes it; repeatable: any "
                   "one is enough)")
    p.add_argument("--signed-identity", metavar="REPO", help="accept signatures made for this repository name "
                   "(default: the one pulled)")
    p.add_argument("--output", metavar="DIR", help="also write each layer that has a title annotation as a file "
                   "under DIR (artifacts, as oras pull does; an existing file is refused)")
    p.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                   help="auto (default): bars on a terminal, else a line per blob and a total every %gs; "
                   "bar, plain, or none" % PROGRESS_INTERVAL)


def _verb_parser(verb: str) -> argparse.ArgumentParser:
    """The parser of one verb (``registry_pull VERB --help``)."""
    p = _argument_parser(prog="registry_pull " + verb, description=_VERBS[verb] + ".", epilog=_EXIT_CODES)
    if verb == "copy":
        p.add_argument("reference", metavar="SRC", nargs="?", help="[docker://]REFERENCE, oci:DIR[:NAME] or "
                       "docker-archive:FILE[:REF]")
        p.add_argument("destination", metavar="DST", nargs="?", help="[docker://]REFERENCE (a registry), "
                       "oci:DIR[:NAME] or docker-archive:FILE")
        p.add_argument("--from-file", metavar="FILE", help="pairs 'SRC DST' one a line, or SRC alone with "
                       "--dest-prefix (# comments; - for stdin)")
        p.add_argument("--dest-prefix", metavar="REGISTRY[/PATH]", help="DST for each SRC: REGISTRY/PATH/ and the "
                       "source's path without its host (as skopeo sync writes it)")
    if verb == "pull":
        p.add_argument("references", metavar="REFERENCE", nargs="*",
                       help="[REGISTRY/]PATH[:TAG][@DIGEST] (e.g. alpine, ghcr.io/o/i@sha256:...) or oci:DIR[:NAME]; "
                       "several share connections, tokens and blobs")
        p.add_argument("--from-file", metavar="FILE", help="more references, one a line (# comments; - for stdin)")
    elif verb in ("inspect", "rm"):
        p.add_argument("reference", metavar="REFERENCE",
                       help="[REGISTRY/]PATH[:TAG][@DIGEST], e.g. alpine, library/alpine:3.20, ghcr.io/o/i@sha256:...")
    elif verb == "tags":
        p.add_argument("reference", metavar="REPOSITORY", help="[REGISTRY/]PATH, e.g. library/alpine, ghcr.io/o/i")
    _common_options(p)
    if verb in ("pull", "inspect", "tags", "copy"):
        _registry_options(p)
    if verb == "copy":
        _platform_option(p, several=False)
        p.add_argument("--all", action="store_true", help="the whole index, every platform and attestation, "
                       "byte for byte (= --platform all)")
        p.add_argument("--referrers", action="store_true", help="copy what refers to the image too (signatures, "
                       "SBOMs): by the referrers API, or the sha256-HEX tag where the destination has none")
        p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE, metavar="BYTES", help="blobs up to this go in "
                       "one PUT, larger ones in chunks of it (default %d MiB)" % (CHUNK_SIZE >> 20))
        p.add_argument("--jobs", type=int, default=JOBS, metavar="N", help="parallel transfers (default %d)" % JOBS)
        p.add_argument("--progress", choices=("auto", "bar", "plain", "none"), default="auto",
                       help="of the downloads from the source, as for pull")
    if verb in ("pull", "inspect", "rm"):
        _platform_option(p, several=verb == "pull")
    if verb == "inspect":
        raw = p.add_mutually_exclusive_group()
        raw.add_argument("--raw", action="store_true", help="print the manifest or index as served, byte for byte "
                         "(with --platform: that platform's manifest)")
        raw.add_argument("--config", action="store_true", help="print the chosen platform's config blob, byte for byte")
    if verb == "pull":
        _pull_options(p)
    return p


def _parser() -> argparse.ArgumentParser:
    """``registry_pull [OPTIONS] REFERENCE``: a pull, as always; the --inspect-style actions of
    0.1 still work here (deprecated: the verbs replace them)."""
    p = _argument_parser(
        prog="registry_pull",
        usage="registry_pull [OPTIONS] REFERENCE\n       registry_pull VERB [OPTIONS] ...  (VERB --help for each)",
        description="Pull a container image from an OCI/Docker registry into a verified local store.\n\nverbs:\n"
        + "".join("  %-8s %s\n" % kv for kv in _VERBS.items())
        + "\n`registry_pull REF` is `registry_pull pull REF`; `pull` names an image called like a verb.",
        epilog=_EXIT_CODES + "\ncredentials: --username/--password-stdin, else $REGISTRY_AUTH_FILE, "
        "$XDG_RUNTIME_DIR/containers/auth.json, $DOCKER_CONFIG/config.json (~/.docker/config.json)",
    )
    p.add_argument("reference", nargs="?", help="image reference, e.g. alpine, library/alpine:3.20, "
                   "ghcr.io/o/i@sha256:...")
    old = p.add_argument_group("deprecated actions (use the verbs: inspect, tags, images, rm, gc, verify)")
    one = old.add_mutually_exclusive_group()
    for flag, verb in _LEGACY_ACTIONS:
        one.add_argument(flag, action="store_true", help="= `registry_pull %s`" % verb)
    old.add_argument("--raw", action="store_true", help="with --inspect: the manifest as served (= inspect --raw)")
    old.add_argument("--config", action="store_true", help="with --inspect: the config blob (= inspect --config)")
    _common_options(p, "print the result as one JSON object on stdout")
    _registry_options(p)
    _platform_option(p, several=True)
    _pull_options(p)
    p.add_argument("--version", action="version", version="registry_pull " + __version__)
    return p


_LEGACY_ACTIONS = (("--inspect", "inspect"), ("--list-tags", "tags"), ("--images", "images"),
                   ("--remove", "rm"), ("--gc", "gc"), ("--verify", "verify"))


def _split_verb(argv: List[str]) -> Tuple[Optional[str], List[str]]:
    """(the verb, the other arguments) when the first argument that is no option is a verb."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            return None, argv
        if arg.startswith("-") and arg != "-":
            i += 2 if arg in _VALUED else 1
            continue
        return (arg, argv[:i] + argv[i + 1:]) if arg in _VERBS else (None, argv)
    return None, argv


def _out(args: Any, doc: Any, lines: List[str]) -> None:
    """--json: one JSON document on stdout; else lines for a person (server strings made printable)."""
    if args.json:
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    else:
        sys.stdout.write("".join(_printable(line, 4000) + "\n" for line in lines))


def _registry_kw(args: Any) -> Dict[str, Any]:
    return dict(insecure=args.insecure, ca_file=args.ca_file, cert_dir=args.cert_dir, username=args.username,
                password=args.password, timeout=args.timeout)


def _cmd_images(args: Any) -> int:
    rows = images(home=args.home)
    lines = ["%-50s %-16s %-19s %9s  %s" % ("REFERENCE", "PLATFORM", "MANIFEST", "SIZE", "PULLED")] if rows else []
    _out(args, rows, lines + ["%-50s %-16s %s %9s  %s" % (r["reference"], r["platform"], r["manifest_digest"][:19],
                                                          _human(r["size"]), r["pulled_at"]) for r in rows])
    return 0


def _cmd_gc(args: Any) -> int:
    files, freed = collect_garbage(home=args.home)
    _out(args, {"deleted": files, "freed_bytes": freed}, ["deleted %d files, freed %s" % (files, _human(freed))])
    return 0


def _cmd_verify(args: Any) -> int:
    bad = verify(home=args.home)
    _out(args, [{"digest": d, "breaks": users} for d, users in bad],
         ["corrupt, removed: %s (breaks %s)" % (d, ", ".join(users) or "no image") for d, users in bad]
         or ["every blob is what its digest says"])
    return 5 if bad else 0


def _cmd_rm(args: Any) -> int:
    ref = _reference(args.reference)
    n = remove(ref, home=args.home, platform=_one_platform(args))
    _out(args, {"removed": n}, ["removed %d image%s of %s" % (n, "" if n == 1 else "s", ref)])
    return 0


def _cmd_tags(args: Any) -> int:
    ref = _reference(args.reference)
    tags = list_tags(ref, home=args.home, **_registry_kw(args))
    _out(args, {"Repository": ref.name, "Tags": tags}, tags)
    return 0


def _cmd_inspect(args: Any) -> int:
    ref = _reference(args.reference)
    if getattr(args, "raw", False) or getattr(args, "config", False):
        data = inspect_raw(ref, config=args.config, platform=_one_platform(args), home=args.home,
                           **_registry_kw(args))
        sys.stdout.flush()
        binary = getattr(sys.stdout, "buffer", None)
        text = data.decode("utf-8", "replace")
        if _isatty(sys.stdout) and not text.replace("\n", "").replace("\t", "").isprintable():
            # A terminal reads escape sequences (C1 controls are valid JSON): shown escaped; a
            # pipe or a file still gets the bytes.
            log.warning("control characters escaped for the terminal: redirect the output for the exact bytes")
            shown = [_printable(line, len(line)).replace("\\x09", "\t") for line in text.split("\n")]
            sys.stdout.write("\n".join(shown))
        elif binary is not None:
            binary.write(data)
        else:  # a text stream (an embedding program's): the same bytes, as text
            sys.stdout.write(data.decode("utf-8", "surrogateescape"))
        sys.stdout.flush()
        return 0
    doc = inspect(ref, home=args.home, platform=_one_platform(args), **_registry_kw(args))
    lines = ["%s  %s" % (doc["Name"], doc["Digest"])]
    for entry in (doc.get("Index") or {}).get("Manifests", []):
        lines.append("  %s %-24s %s%s" % ("*" if entry["Chosen"] else " ",
                                          entry.get("Platform") or entry.get("Kind", ""), entry["Digest"],
                                          "  " + _human(entry["Size"]) if "Size" in entry else ""))
    lines += ["image     %s (%s, %s)" % (doc["ManifestDigest"], doc["Platform"], doc["PlatformMatch"]),
              "created   %s" % doc["Created"],
              "layers    %d, %s" % (len(doc["Layers"]), _human(doc["Size"]))]
    lines += ["%-9s %s" % (k.lower(), json.dumps(v)) for k, v in sorted(doc["Config"].items()) if v]
    lines += ["env       %s" % e for e in doc["Env"] or []]
    lines += ["label     %s=%s" % kv for kv in sorted((doc["Labels"] or {}).items())]
    lines += ["referrer  %s %s%s" % (r["Digest"], r.get("ArtifactType") or r["MediaType"],
                                     " (%s)" % r["Tag"] if r.get("Tag") else "") for r in doc.get("Referrers", [])]
    _out(args, doc, lines)
    return 0


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _one_platform(args: Any) -> Optional[str]:
    platforms = args.platform or []
    if len(platforms) > 1 or "all" in platforms:
        raise UsageError("this takes exactly one --platform")
    return platforms[0] if platforms else None


def _progress(args: Any) -> Optional[Callable[[str, int, int], None]]:
    mode = args.progress
    if args.quiet or mode == "none" or (mode == "auto" and args.json):
        return None
    if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
        return _Bars(sys.stderr)
    return _Lines(sys.stderr)


def _read_keys(args: Any) -> List[Union[str, bytes]]:
    keys: List[Union[str, bytes]] = []
    for path in args.verify_key or []:
        try:
            with open(path, "rb") as f:
                keys.append(f.read(65536))
        except OSError as e:
            raise UsageError("cannot read --verify-key %s: %s" % (path, e.strerror or e)) from None
    return keys


def _cmd_pull(args: Any) -> int:
    if len(getattr(args, "references", None) or []) > 1:
        return _cmd_pull_many(args)
    ref = _reference(args.reference)
    platforms = args.platform or []
    progress = _progress(args)
    started = time.monotonic()
    kw = dict(home=args.home, jobs=args.jobs, progress=progress, cancel=args.cancel, oci_layout=args.oci_layout,
              **_registry_kw(args))
    if len(platforms) > 1 or "all" in platforms:
        ignored = [flag for flag, given in (("--rootfs", args.rootfs), ("--docker-archive", args.docker_archive),
                                            ("--mirror", args.mirror), ("--output", args.output),
                                            ("--referrers", args.referrers), ("--offline", args.offline)) if given]
        if ignored:
            raise UsageError("%s take%s exactly one platform"
                             % (" and ".join(ignored), "" if len(ignored) > 1 else "s"))
        index_digest, results = pull_platforms(ref, "all" if platforms == ["all"] else platforms,
                                               verify_keys=_read_keys(args) or None,
                                               signed_identity=args.signed_identity, **kw)
        if args.json:
            _out(args, {"index_digest": index_digest, "images": [r.to_json() for r in results]}, [])
        elif not args.quiet:  # a summary, as for one platform: on stderr
            lines = ["pulled %s (%s) %s" % (r.reference, r.platform, r.manifest_digest) for r in results]
            lines.append("index %s, %.1fs; in %s%s" % (index_digest, time.monotonic() - started,
                                                       results[0].home if results else args.home or default_home(),
                                                       ", layout %s" % args.oci_layout if args.oci_layout else ""))
            sys.stderr.write("".join(_printable("registry_pull: " + ln, 2000) + "\n" for ln in lines))
        return 0
    keys = _read_keys(args)
    if args.tar == "-" and args.json:
        raise UsageError("--tar - writes the tar on standard output: not with --json")
    result = pull(ref, platform=platforms[0] if platforms else None, docker_archive=args.docker_archive,
                  rootfs=args.rootfs, mirrors=args.mirror, overwrite=args.overwrite, output=args.output,
                  owners=args.owners, tar=args.tar,
                  verify_keys=keys or None, signed_identity=args.signed_identity, referrers=args.referrers,
                  offline=args.offline, **kw)
    if args.json:
        sys.stdout.write(json.dumps(result.to_json(), indent=2) + "\n")
    elif not args.quiet:
        where = ", ".join(["store %s" % result.home] + ["%s %s" % (k.replace("_", " "), v) for k, v in result.outputs])
        sys.stderr.write(_printable(
            "registry_pull: pulled %s (%s) %s, %d layer%s, %s; downloaded %s in %.1fs; into %s"
            % (result.reference, result.platform, result.manifest_digest, len(result.layers),
               "" if len(result.layers) == 1 else "s", _human(result.size), _human(result.downloaded_bytes),
               time.monotonic() - started, where), 2000) + "\n")
    return 0


def _cmd_pull_many(args: Any) -> int:
    """Several references: each tried in order; one line each; the exit code of the first failure."""
    if args.rootfs or args.output or (args.platform and (len(args.platform) > 1 or "all" in args.platform)):
        raise UsageError("--rootfs, --output and several platforms take one reference")
    refs = [_reference(r) for r in args.references]  # a bad one is a usage error before anything is fetched
    started = time.monotonic()
    results = pull_many(refs, home=args.home, platform=_one_platform(args), jobs=args.jobs, progress=_progress(args),
                        cancel=args.cancel, oci_layout=args.oci_layout, docker_archive=args.docker_archive,
                        mirrors=args.mirror, overwrite=args.overwrite, verify_keys=_read_keys(args) or None,
                        signed_identity=args.signed_identity, referrers=args.referrers, offline=args.offline,
                        **_registry_kw(args))
    if args.json:
        _out(args, [r.to_json() if isinstance(r, PullResult) else
                    {"reference": str(ref), "error": _printable(r, 2000), "exit_code": r.exit_code}
                    for ref, r in zip(refs, results)], [])
    elif not args.quiet:
        lines = [("pulled %s (%s) %s" % (r.reference, r.platform, r.manifest_digest)) if isinstance(r, PullResult)
                 else "failed %s: %s" % (ref, r) for ref, r in zip(refs, results)]
        ok = sum(isinstance(r, PullResult) for r in results)
        lines.append("%d of %d pulled in %.1fs" % (ok, len(results), time.monotonic() - started))
        sys.stderr.write("".join(_printable("registry_pull: " + ln, 2000) + "\n" for ln in lines))
    return next((r.exit_code for r in results if isinstance(r, PullError)), 0)


def _copy_pairs(args: Any) -> List[Tuple[str, str]]:
    """(SRC, DST) pairs: the arguments, or --from-file's lines (SRC DST, or SRC and --dest-prefix)."""
    lines: List[Tuple[str, Optional[str]]] = [(args.reference, args.destination)] if args.reference else []
    for ln in _references_from(args.from_file) if args.from_file else []:
        words = ln.split()
        if len(words) > 2:
            raise UsageError("--from-file line %r: expected SRC [DST]" % _printable(ln, 200))
        lines.append((words[0], words[1] if len(words) == 2 else None))
    pairs = []
    for src, dst in lines:
        if dst is None:
            if not args.dest_prefix:
                raise UsageError("%s has no destination: give SRC DST, or --dest-prefix" % _printable(src, 200))
            ref = _reference(_strip_transport(src))
            if isinstance(ref, (_LayoutReference, _ArchiveReference)):
                raise UsageError("--dest-prefix maps registry sources only, not %s" % src)
            dst = "%s/%s:%s" % (args.dest_prefix.rstrip("/"), ref.repository, ref.tag or "latest") if not ref.digest \
                else "%s/%s@%s" % (args.dest_prefix.rstrip("/"), ref.repository, ref.digest)
        pairs.append((src, dst.strip()))
    if not pairs:
        raise UsageError("copy needs SRC and DST (or --from-file)")
    return pairs


def _cmd_copy(args: Any) -> int:
    platforms = args.platform or []
    every = args.all or platforms == ["all"]
    pairs = _copy_pairs(args)
    hosts = set(_reference(_strip_transport(dst)).registry for _, dst in pairs)
    if len(hosts) > 1 and (args.username or args.cert_dir):
        raise UsageError("--username and --cert-dir are for one registry, and these destinations name %d: %s"
                         % (len(hosts), ", ".join(sorted(hosts))))
    codes, docs = [], []
    for src, dst in pairs:
        try:
            doc = copy(src, dst, home=args.home, platform=None if every else _one_platform(args),
                       all_platforms=every, chunk_size=args.chunk_size, jobs=args.jobs, cancel=args.cancel,
                       progress=None if args.quiet else _progress(args), referrers=args.referrers,
                       **_registry_kw(args))
        except PullError as e:
            if len(pairs) == 1 or isinstance(e, (Interrupted, UsageError)):
                raise
            sys.stderr.write("registry_pull: failed %s -> %s: %s\n" % (_printable(src, 300), _printable(dst, 300),
                                                                       _printable(e, 1000)))
            codes.append(e.exit_code)
            continue
        docs.append(doc)
        if not args.quiet and not args.json:
            sys.stderr.write(_printable("registry_pull: copied %s to %s %s: %d blobs uploaded, %d mounted, %d there "
                                        "already" % (doc["source"], doc["destination"], doc["digest"],
                                                     len(doc["uploaded"]), len(doc["mounted"]), len(doc["skipped"])),
                                        2000) + "\n")
    if args.json:
        _out(args, docs[0] if len(pairs) == 1 else docs, [])
    return codes[0] if codes else 0


_COMMANDS: Dict[str, Callable[[Any], int]] = {
    "pull": _cmd_pull, "inspect": _cmd_inspect, "tags": _cmd_tags, "images": _cmd_images, "rm": _cmd_rm,
    "gc": _cmd_gc, "verify": _cmd_verify, "copy": _cmd_copy,
}


def _parse_args(argv: List[str]) -> Any:
    """The arguments of a verb, or of the verb-less form (a pull, or a deprecated action)."""
    verb, rest = _split_verb(argv)
    args = (_verb_parser(verb) if verb else _parser()).parse_args(rest)
    if verb is None:
        verb = next((v for flag, v in _LEGACY_ACTIONS if getattr(args, flag[2:].replace("-", "_"))), "pull")
        if verb in ("images", "gc", "verify") and args.reference:
            raise UsageError("--images, --gc and --verify take no REFERENCE")
    if verb == "pull" and hasattr(args, "references"):
        refs = list(args.references) + (_references_from(args.from_file) if args.from_file else [])
        args.references = refs
        args.reference = refs[0] if refs else None
    args.verb = verb
    return args


def _read_password(args: Any) -> Optional[str]:
    if getattr(args, "password_argument", None) is not None:
        raise UsageError("--password is not accepted: a password in the arguments ends up in shell history and "
                         "process lists; use --username USER --password-stdin")
    if getattr(args, "password_stdin", False):
        if not args.username:
            raise UsageError("--password-stdin needs --username")
        return sys.stdin.readline().rstrip("\r\n")
    if getattr(args, "username", None):
        raise UsageError("--username needs --password-stdin (passwords are never taken as arguments)")
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """The command line (``argv`` without the program name; default sys.argv[1:]): returns the
    exit status (README's table) and never raises, whatever goes wrong."""
    verbose = 0
    _PARTIAL.clear()  # this command's own downloads, not an earlier main()'s in the same process
    cancel = threading.Event()
    try:
        try:
            args = _parse_args(list(sys.argv[1:] if argv is None else argv))
        except SystemExit as e:  # --help, --version, or a usage error already said
            return int(e.code or 0) if not isinstance(e.code, str) else 2
        verbose = args.verbose
        log.command_line(log.ERROR if args.quiet else log.DEBUG if verbose > 1 else
                         log.INFO if verbose else log.WARNING)
        args.password, args.cancel = _read_password(args), cancel
        if args.verb in ("pull", "inspect", "tags", "rm") and not args.reference:
            raise UsageError("a REFERENCE is needed (e.g. alpine:3.20); see --help")
        return _COMMANDS[args.verb](args)
    except KeyboardInterrupt:
        cancel.set()
        kept = "; partial downloads are kept and will resume" if _PARTIAL.is_set() else ""
        sys.stderr.write("registry_pull: error: interrupted%s\n" % kept)
        return 130
    except PullError as e:
        cancel.set()
        sys.stderr.write("registry_pull: error: %s\n" % _printable(e, 2000))
        return e.exit_code
    except Exception as e:  # a bug: still one line (the traceback with -v), never a crash dump
        cancel.set()
        if verbose:
            import traceback

            traceback.print_exc()
        sys.stderr.write("registry_pull: error: internal error %s: %s (please report it)\n"
                         % (e.__class__.__name__, _printable(e, 300)))
        return 1
    finally:
        log.command_line(None)


def _exit(code: int) -> None:
    """The command line's end: atexit's functions run, the standard streams are flushed, and the
    process ends at once. The interpreter's own teardown (freeing every module and object: 20-30
    ms, a fifth of a warm re-pull) has nothing left to do for this process, whose files are all
    closed by now. Under a tracer, a profiler or ``python -i`` (which go on after the script
    returns) it exits as usual."""
    import atexit
    run = getattr(atexit, "_run_exitfuncs", None)  # CPython's, since 3.0
    monitoring = getattr(sys, "monitoring", None)  # 3.12+: coverage and debuggers without a trace function
    if run is None or sys.gettrace() is not None or sys.getprofile() is not None or sys.flags.inspect or \
            (monitoring is not None and any(monitoring.get_tool(i) for i in range(6))):
        sys.exit(code)
    run()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # a closed pipe: the interpreter's exit says so as it always has
        sys.exit(code)
    os._exit(code)


if __name__ == "__main__":
    _exit(main())
