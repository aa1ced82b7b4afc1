"""Tests for registry_pull: real HTTP on 127.0.0.1, no internet.

    python -m unittest -v test_registry_pull

An in-process registry (http.server in a thread) serves images the tests build and injects
faults; tests that need the real CNCF Distribution registry and skopeo skip with a reason
when those programs are absent.
"""

import ast
import base64
import contextlib
import glob
import gzip
import hashlib
import http.server
import io
import json
import os
import platform as platform_mod
import random
import re
import resource
import shlex
import shutil
import signal
import socket
try:
    import sqlite3
except ImportError:  # a Python built without it: the product works, these tests skip what needs it
    sqlite3 = None
import stat
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import typing
import unittest
import urllib.parse

try:
    import hypothesis
    from hypothesis import strategies as st
except ImportError:
    hypothesis = None

import registry_pull as rp  # the one place the module is named: a vendored copy can be tested too

HERE = os.path.dirname(os.path.abspath(__file__))


# --------------------------------------------------------------------------- helpers


def sha256(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_layer(files, compress=True):
    """A layer tar (gzip unless compress=False) holding ``{name: bytes}``; returns (blob, diff_id)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = 1700000000
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    blob = gzip.compress(raw, mtime=0) if compress else raw
    return blob, sha256(raw)


OCI = {"index": rp.MT_OCI_INDEX, "manifest": rp.MT_OCI_MANIFEST, "config": rp.MT_OCI_CONFIG,
       "layer": "application/vnd.oci.image.layer.v1.tar+gzip"}
DOCKER = {"index": rp.MT_DOCKER_LIST, "manifest": rp.MT_DOCKER_MANIFEST, "config": rp.MT_DOCKER_CONFIG,
          "layer": "application/vnd.docker.image.rootfs.diff.tar.gzip"}


class Image:
    """An image built in memory: config, layers and manifest bytes."""

    def __init__(self, arch="amd64", variant="", layers=None, types=OCI, env=None):
        self.types = types
        layers = layers if layers is not None else [
            make_layer({"etc/arch": arch.encode(), "bin/tool": os.urandom(3000)}),
            make_layer({"data/blob": os.urandom(200000)}),  # incompressible: a real-sized body
        ]
        self.layers = [blob for blob, _ in layers]
        config = {
            "architecture": arch, "os": "linux", "created": "2026-01-01T00:00:00Z",
            "config": {"Env": env or ["PATH=/usr/bin"], "Cmd": ["/bin/sh"], "WorkingDir": "/",
                       "User": "0", "ExposedPorts": {"80/tcp": {}}},
            "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
            "history": [{"created_by": "test"}],
        }
        if variant:
            config["variant"] = variant
        self.config = json.dumps(config).encode()
        self.manifest = json.dumps({
            "schemaVersion": 2, "mediaType": types["manifest"],
            "config": {"mediaType": types["config"], "digest": sha256(self.config), "size": len(self.config)},
            "layers": [{"mediaType": types["layer"], "digest": sha256(b), "size": len(b)} for b in self.layers],
        }).encode()
        self.digest = sha256(self.manifest)
        self.arch, self.variant = arch, variant

    @property
    def size(self):
        return len(self.config) + sum(len(b) for b in self.layers)

    def edit(self, config=None, manifest=None):
        """Change the config and/or manifest documents in place; descriptors and digest follow."""
        if config:
            doc = json.loads(self.config)
            config(doc)
            self.config = json.dumps(doc).encode()
        doc = json.loads(self.manifest)
        doc["config"].update(digest=sha256(self.config), size=len(self.config))
        if manifest:
            manifest(doc)
        self.manifest = json.dumps(doc).encode()
        self.digest = sha256(self.manifest)
        return self

    def blobs(self):
        return dict((sha256(b), b) for b in [self.config] + self.layers)


def make_index(images, types=OCI, attestations=True):
    manifests = []
    for img in images:
        plat = {"os": "linux", "architecture": img.arch}
        if img.variant:
            plat["variant"] = img.variant
        manifests.append({"mediaType": types["manifest"], "digest": img.digest, "size": len(img.manifest),
                          "platform": plat})
        if attestations:
            manifests.append({"mediaType": types["manifest"], "digest": sha256(b"att-" + img.digest.encode()),
                              "size": 10, "platform": {"os": "unknown", "architecture": "unknown"},
                              "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                              "vnd.docker.reference.digest": img.digest}})
    return json.dumps({"schemaVersion": 2, "mediaType": types["index"], "manifests": manifests}).encode()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass


def serve(case, handler):
    """Start ``handler`` on 127.0.0.1:0 in a thread (as CPython's test_httpservers does); stop at cleanup."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    report = server.handle_error

    def handle_error(request, client_address):
        # A client that drops a connection (a cancelled download, the loopback HTTPS probe, a
        # pooled connection closed at the end of a pull) is not a server bug worth a traceback.
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            report(request, client_address)
    server.handle_error = handle_error
    # Polled every 50 ms, not serve_forever's 0.5 s: shutdown() at cleanup waits for the poll, per server.
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    case.addCleanup(server.server_close)
    case.addCleanup(server.shutdown)
    return server, "127.0.0.1:%d" % server.server_address[1]


class Registry:
    """An in-process OCI registry on 127.0.0.1 with auth and fault injection."""

    def __init__(self, auth=None, token_lifetime=300, users=None, per_repo=False):
        self.auth = auth  # None, "basic" or "bearer"
        self.users = users if users is not None else {"alice": "s3cret"}
        self.anonymous_tokens = True
        self.token_lifetime = token_lifetime
        self.token_answer = "both"  # "token", "access_token" or "both"
        self.tokens = {}  # token -> expiry
        self.refused_tokens = []  # (method, path) of requests whose token was expired or unknown
        self.token_requests = []
        self.blobs = {}
        self.manifests = {}  # (repo, ref) -> (media_type, bytes)
        self.log = []  # (method, path, headers)
        self.honour_range = True
        self.head_allowed = True
        self.redirect_to = None  # base URL blob GETs are redirected to
        self.redirect_hops = 1  # 2: the object store redirects once more
        self.v2_wants_auth = False  # 401 on /v2/ while repositories are anonymous (seen on GHCR-like setups)
        self.challenge_prefix = ""  # e.g. 'Basic realm="x", ' before the Bearer challenge
        self.send_expires_in = True
        self.fault = None  # callable(handler, method, path) -> True when it answered
        # Pushes (distribution spec): POST an upload, PATCH chunks, PUT ?digest=, PUT manifests.
        self.per_repo = per_repo  # True: a blob is in a repository only once pushed, mounted or uploaded there
        self.links = {}  # repo -> set of blob digests pushed, mounted or uploaded there
        self.uploads = {}  # upload id -> {"repo": repo, "data": bytearray}: the sessions open now
        self.uploaded = []  # (repo, digest) of every upload completed by a PUT ?digest=
        self.mounted = []  # (repo, digest, from) of every cross-repository mount granted
        self.received = 0  # upload body bytes read (POST, PATCH and PUT bodies; a cut PATCH's part too)
        self.refuse_mount = False  # True: POST ?mount= answers 202 and an upload session, as if not mountable
        self.refuse_chunked = False  # True (405) or 400: every PATCH answered so, UNSUPPORTED; the session stays
        self.cut_patch = None  # N: the Nth PATCH (counted from 1, over the registry) is cut halfway through its body
        self.keep_cut_uploads = True  # the cut PATCH's bytes read are kept (GET answers 204 + Range); False: the
        #                               session is dropped (GET, PATCH and PUT on it answer 404 BLOB_UPLOAD_INVALID)
        self.patches = 0  # PATCH requests seen
        self.check_references = True  # a manifest PUT whose blobs or child manifests are absent: 400
        self.lock = threading.Lock()
        self.server = None

    # -- content ---------------------------------------------------------------------

    def push(self, repo, tag, image):
        self.blobs.update(image.blobs())
        self.links.setdefault(repo, set()).update(image.blobs())
        self.manifests[(repo, image.digest)] = (image.types["manifest"], image.manifest)
        if tag:
            self.manifests[(repo, tag)] = (image.types["manifest"], image.manifest)
        return image

    def push_index(self, repo, tag, images, types=OCI, attestations=True):
        for img in images:
            self.push(repo, None, img)
        data = make_index(images, types, attestations)
        self.manifests[(repo, tag)] = (types["index"], data)
        self.manifests[(repo, sha256(data))] = (types["index"], data)
        return sha256(data)

    def requests(self, method=None, kind=None):
        with self.lock:
            return [(m, p) for m, p, _ in self.log
                    if (method is None or m == method) and (kind is None or "/%s/" % kind in p)]

    def blob(self, repo, digest):
        """The blob as repository ``repo`` has it (every repository has every blob unless per_repo)."""
        data = self.blobs.get(digest)
        if data is not None and self.per_repo and digest not in self.links.get(repo, ()):
            return None
        return data

    def uploads_of(self, digest=None):
        """(method, path, headers) of the upload requests (POST, PATCH, PUT, GET, DELETE on .../blobs/uploads/),
        only those that end with ``digest`` when given (the PUT ?digest=, a POST ?mount=)."""
        with self.lock:
            return [(m, p, h) for m, p, h in self.log if "/blobs/uploads/" in p and
                    (digest is None or "digest=" + digest in p or "mount=" + digest in p)]

    # -- server ----------------------------------------------------------------------

    def start(self, case):
        reg = self

        class Handler(QuietHandler):
            def do_HEAD(self):
                self.handle_any("HEAD")

            def do_GET(self):
                self.handle_any("GET")

            def do_POST(self):
                self.handle_any("POST")

            def do_PUT(self):
                self.handle_any("PUT")

            def do_PATCH(self):
                self.handle_any("PATCH")

            def do_DELETE(self):
                self.handle_any("DELETE")

            def send(self, status, body=b"", headers=None, head=False):
                self.send_response(status)
                headers = dict(headers or {})
                headers.setdefault("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head and body:
                    try:
                        self.wfile.write(body)
                    except (BrokenPipeError, ConnectionResetError):
                        pass

            def error(self, status, code, head=False, headers=None):
                body = json.dumps({"errors": [{"code": code, "message": code.lower()}]}).encode()
                h = {"Content-Type": "application/json"}
                h.update(headers or {})
                self.send(status, body, h, head)

            def handle_any(self, method):
                path = urllib.parse.urlsplit(self.path).path
                with reg.lock:
                    reg.log.append((method, self.path, dict(self.headers)))
                self.body, cut = b"", False
                if method in ("PUT", "PATCH", "DELETE") or (method == "POST" and path != "/token"):
                    if method == "PATCH":
                        with reg.lock:
                            reg.patches += 1
                            cut = reg.cut_patch == reg.patches
                    self.body = self.read_body(cut)
                    if "/blobs/uploads/" in path:
                        with reg.lock:
                            reg.received += len(self.body)
                if reg.fault and reg.fault(self, method, path):
                    return
                if cut:
                    return self.cut(path)
                if path == "/token":
                    return self.token()
                if not self.authorized(path):
                    return
                up = re.match(r"^/v2/(.+)/blobs/uploads/([^/]*)$", path)
                if up:
                    return self.upload(method, up.group(1), up.group(2))
                if method not in ("GET", "HEAD"):
                    m = re.match(r"^/v2/(.+)/manifests/([^/]+)$", path)
                    if method == "PUT" and m:
                        return self.put_manifest(*m.groups())
                    return self.error(405, "UNSUPPORTED")
                if path == "/v2/":
                    if reg.v2_wants_auth and "Authorization" not in self.headers:
                        return self.error(401, "UNAUTHORIZED", method == "HEAD", {"WWW-Authenticate":
                                          'Bearer realm="http://%s/token",service="test-registry"' % reg.host})
                    return self.send(200, b"{}", {"Content-Type": "application/json"}, method == "HEAD")
                m = re.match(r"^/v2/(.+)/(manifests|blobs)/([^/]+)$", path)
                if not m:
                    return self.error(404, "NAME_UNKNOWN", method == "HEAD")
                repo, kind, ref = m.groups()
                if kind == "manifests":
                    if method == "HEAD" and not reg.head_allowed:
                        return self.send(405, head=True)
                    found = reg.manifests.get((repo, ref))
                    if not found:
                        return self.error(404, "MANIFEST_UNKNOWN", method == "HEAD")
                    mt, data = found
                    return self.send(200, data, {"Content-Type": mt, "Docker-Content-Digest": sha256(data)},
                                     method == "HEAD")
                data = reg.blob(repo, ref)
                if data is None:
                    return self.error(404, "BLOB_UNKNOWN", method == "HEAD")
                if reg.redirect_to and method == "GET":
                    hop = "hop" if reg.redirect_hops == 2 else "obj"
                    return self.send(307, headers={"Location": "%s/%s/%s?sig=secret" % (reg.redirect_to, hop, ref)})
                self.serve_blob(data, method)

            def read_body(self, cut=False):
                """The request body (Content-Length or chunked); half of it, then nothing more, if ``cut``."""
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = bytearray()
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                        if not size:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass
                            return bytes(body)
                        if cut:
                            return bytes(body) + self.rfile.read(max(1, size // 2))
                        body += self.rfile.read(size)
                        self.rfile.readline()
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(max(1, n // 2) if cut and n else n)

            def location(self, repo, uid):
                data = reg.uploads[uid]["data"]
                return {"Location": "/v2/%s/blobs/uploads/%s?_state=%s-%d" % (repo, uid, uid[:8], len(data)),
                        "Range": "0-%d" % (len(data) - 1), "Docker-Upload-UUID": uid}

            def cut(self, path):
                """The connection cut in the middle of a PATCH body: what was read is kept or the session dropped."""
                uid = path.rsplit("/", 1)[-1]
                with reg.lock:
                    if uid in reg.uploads:
                        if reg.keep_cut_uploads:
                            reg.uploads[uid]["data"] += self.body
                        else:
                            del reg.uploads[uid]
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def upload(self, method, repo, uid):
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if not uid:  # POST /v2/NAME/blobs/uploads/: a new session, a mount or a monolithic upload
                    if method != "POST":
                        return self.error(405, "UNSUPPORTED")
                    mount, source = q.get("mount", [None])[0], q.get("from", [None])[0]
                    if mount and source and not reg.refuse_mount and reg.blob(source, mount) is not None:
                        with reg.lock:
                            reg.links.setdefault(repo, set()).add(mount)
                            reg.mounted.append((repo, mount, source))
                        return self.send(201, headers={"Location": "/v2/%s/blobs/%s" % (repo, mount),
                                                       "Docker-Content-Digest": mount})
                    uid = "%032x" % int.from_bytes(os.urandom(16), "big")
                    with reg.lock:
                        reg.uploads[uid] = {"repo": repo, "data": bytearray()}
                    if q.get("digest") and not mount:
                        return self.complete(repo, uid, q["digest"][0])
                    return self.send(202, headers=self.location(repo, uid))
                session = reg.uploads.get(uid)
                if session is None or session["repo"] != repo:
                    return self.error(404, "BLOB_UPLOAD_INVALID", method == "HEAD")
                if method in ("GET", "HEAD"):
                    return self.send(204, headers=self.location(repo, uid), head=True)
                if method == "DELETE":
                    with reg.lock:
                        reg.uploads.pop(uid, None)
                    return self.send(204, head=True)
                if method == "PATCH":
                    if reg.refuse_chunked:
                        return self.error(400 if reg.refuse_chunked == 400 else 405, "UNSUPPORTED")
                    rng = self.headers.get("Content-Range")
                    if rng is not None:
                        m = re.match(r"^(?:bytes[ =])?(\d+)-(\d+)$", rng.strip())
                        if (not m or int(m.group(1)) != len(session["data"]) or
                                int(m.group(2)) - int(m.group(1)) + 1 != len(self.body)):
                            return self.send(416, headers=self.location(repo, uid))
                    with reg.lock:
                        session["data"] += self.body
                    return self.send(202, headers=self.location(repo, uid))
                if method == "PUT":
                    return self.complete(repo, uid, q.get("digest", [""])[0])
                return self.error(405, "UNSUPPORTED")

            def complete(self, repo, uid, digest):
                with reg.lock:
                    session = reg.uploads.pop(uid)
                    data = bytes(session["data"] + self.body)
                    if not digest or sha256(data) != digest:
                        ok = False
                    else:
                        ok = True
                        reg.blobs[digest] = data
                        reg.links.setdefault(repo, set()).add(digest)
                        reg.uploaded.append((repo, digest))
                if not ok:
                    return self.error(400, "DIGEST_INVALID")
                self.send(201, headers={"Location": "/v2/%s/blobs/%s" % (repo, digest), "Docker-Content-Digest": digest})

            def put_manifest(self, repo, ref):
                data, mt = self.body, self.headers.get("Content-Type", "")
                digest = sha256(data)
                if ref.startswith("sha256:") and ref != digest:
                    return self.error(400, "DIGEST_INVALID")
                try:
                    doc = json.loads(data)
                except ValueError:
                    return self.error(400, "MANIFEST_INVALID")
                if not isinstance(doc, dict) or doc.get("mediaType", mt) != mt:
                    return self.error(400, "MANIFEST_INVALID")
                if reg.check_references:
                    if "manifests" in doc:
                        if any((repo, d.get("digest")) not in reg.manifests for d in doc["manifests"]):
                            return self.error(400, "MANIFEST_BLOB_UNKNOWN")
                    else:
                        wanted = ([doc.get("config", {})] + list(doc.get("layers", [])))
                        if any(reg.blob(repo, d.get("digest")) is None for d in wanted):
                            return self.error(400, "MANIFEST_BLOB_UNKNOWN")
                with reg.lock:
                    reg.manifests[(repo, ref)] = (mt, data)
                    reg.manifests[(repo, digest)] = (mt, data)
                self.send(201, headers={"Location": "/v2/%s/manifests/%s" % (repo, digest),
                                        "Docker-Content-Digest": digest})

            def serve_blob(self, data, method="GET"):
                rng = self.headers.get("Range")
                m = re.match(r"^bytes=(\d+)-$", rng or "")
                if m and reg.honour_range:
                    start = int(m.group(1))
                    if start >= len(data):
                        return self.send(416, headers={"Content-Range": "bytes */%d" % len(data)})
                    return self.send(206, data[start:], {
                        "Content-Range": "bytes %d-%d/%d" % (start, len(data) - 1, len(data)),
                        "Content-Type": "application/octet-stream"}, method == "HEAD")
                self.send(200, data, {"Content-Type": "application/octet-stream"}, method == "HEAD")

            def token(self):
                q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                if self.command == "POST":
                    n = int(self.headers.get("Content-Length") or 0)
                    q = urllib.parse.parse_qs(self.rfile.read(n).decode())
                auth = self.headers.get("Authorization", "")
                with reg.lock:
                    reg.token_requests.append((self.command, q, auth))
                if auth.startswith("Basic "):
                    user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                    if reg.users.get(user) != pw:
                        return self.error(401, "UNAUTHORIZED")
                elif self.command == "POST":
                    if q.get("refresh_token") != ["refresh-me"]:
                        return self.error(401, "UNAUTHORIZED")
                elif not reg.anonymous_tokens:
                    return self.error(401, "UNAUTHORIZED")
                with reg.lock:
                    tok = "tok-%d" % len(reg.token_requests)
                    reg.tokens[tok] = time.time() + reg.token_lifetime
                answer = {"expires_in": reg.token_lifetime} if reg.send_expires_in else {}
                if reg.token_answer in ("token", "both"):
                    answer["token"] = tok
                if reg.token_answer in ("access_token", "both"):
                    answer["access_token"] = tok
                self.send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

            def authorized(self, path):
                auth = self.headers.get("Authorization", "")
                head = self.command == "HEAD"
                if reg.auth == "basic":
                    if auth.startswith("Basic "):
                        user, _, pw = base64.b64decode(auth[6:]).decode().partition(":")
                        if reg.users.get(user) == pw:
                            return True
                    self.error(401, "UNAUTHORIZED", head, {"WWW-Authenticate": 'Basic realm="test"'})
                    return False
                if reg.auth == "bearer":
                    tok = auth[7:] if auth.startswith("Bearer ") else None
                    expiry = reg.tokens.get(tok)
                    if expiry and time.time() < expiry:
                        return True
                    if tok:
                        reg.refused_tokens.append((self.command, path))
                    m = re.match(r"^/v2/(.+)/(?:manifests|blobs)/", path)
                    actions = "pull" if self.command in ("GET", "HEAD") else "pull,push"
                    scope = ',scope="repository:%s:%s"' % (m.group(1), actions) if m else ""
                    err = ',error="invalid_token"' if tok else ""
                    self.error(401, "UNAUTHORIZED", head, {"WWW-Authenticate": reg.challenge_prefix +
                               'Bearer realm="http://%s/token",service="test-registry"%s%s' % (reg.host, scope, err)})
                    return False
                return True

        self.server, self.host = serve(case, Handler)
        return self


class ObjectStore:
    """A second server standing in for S3: serves /obj/DIGEST, refuses any Authorization header."""

    def __init__(self, registry):
        self.registry = registry
        self.log = []

    def start(self, case):
        store = self

        class Handler(QuietHandler):
            def do_GET(self):
                store.log.append((self.path, dict(self.headers)))
                digest = urllib.parse.urlsplit(self.path).path.rsplit("/", 1)[-1]
                if self.path.startswith("/hop/"):  # a CDN edge sending us on to the origin
                    self.send_response(302)
                    self.send_header("Location", "/obj/%s?sig=again" % digest)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if "Authorization" in self.headers:
                    body = b"<Error><Code>InvalidArgument</Code>Only one auth mechanism allowed</Error>"
                    self.send_response(400)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = store.registry.blobs[digest]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server, host = serve(case, Handler)
        self.url = "http://" + host
        return self


# A progress line (README: --progress): "sha256:0123456789ab 3.1 KiB done in 0.0s (67.0 KiB/s)",
# "... present", or the periodic total "1.2 MiB of 2.0 MiB (60%), 3.0 MiB/s, ETA 1s".
PROGRESS_LINE = re.compile(r"registry_pull: (sha256:[0-9a-f]{12} \S+ \S+ (done in |present)|\S+ \S+ of \S+ \S+ \(\d+%\), )")


class Base(unittest.TestCase):
    def setUp(self):
        self.home = tempfile.mkdtemp(prefix="rp-home-")
        self.addCleanup(lambda: subprocess.call(["rm", "-rf", self.home]))
        # Fast retries, so fault tests take milliseconds; the real waits are documented in --help.
        for name, value in (("RETRY_BASE", 0.01), ("RETRY_MAX", 0.05)):
            old = getattr(rp, name)
            setattr(rp, name, value)
            self.addCleanup(setattr, rp, name, old)
        # No credentials from the developer's own files.
        env = {"HOME": self.home, "DOCKER_CONFIG": os.path.join(self.home, "no-docker"),
               "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": ""}
        for k, v in env.items():
            old = os.environ.get(k)
            os.environ[k] = v
            self.addCleanup(self._restore_env, k, old)

    @staticmethod
    def _restore_env(k, old):
        if old is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = old

    def registry(self, **kw):
        return Registry(**kw).start(self)

    def pull(self, reg, ref, **kw):
        kw.setdefault("home", self.home)
        kw.setdefault("platform", "linux/amd64")
        return rp.pull("%s/%s" % (reg.host, ref), **kw)

    def main(self, *argv):
        """Run the CLI in-process; return (exit code, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = rp.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def assertStoreHas(self, image):
        for digest, data in image.blobs().items():
            path = os.path.join(self.home, "blobs", "sha256", digest.split(":")[1])
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data, digest)

    def stray_files(self):
        found = []
        for root, _, files in os.walk(os.path.join(self.home, "blobs")):
            found += [f for f in files if not re.match(r"^[0-9a-f]{64}$", f)]
        return found

    def image_rows(self):
        if sqlite3 is None:
            self.skipTest("this Python has no sqlite3 module")
        db = os.path.join(self.home, "oci.db")
        if not os.path.exists(db):
            return []
        with contextlib.closing(sqlite3.connect(db)) as conn:
            return conn.execute("SELECT reference FROM images").fetchall()

    def set_constant(self, name, value):
        """rp.NAME = value for this test (created if this version of the module lacks it)."""
        missing = object()
        old = getattr(rp, name, missing)
        setattr(rp, name, value)
        self.addCleanup(lambda: delattr(rp, name) if old is missing else setattr(rp, name, old))

    def no_network_names(self):
        """No proxy, and no name resolved but loopback: any other getaddrinfo fails as an unknown
        name does (and is recorded), so nothing leaves the machine whatever the code under test does."""
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
            for var in (name, name.lower()):
                self.addCleanup(self._restore_env, var, os.environ.get(var))
                os.environ.pop(var, None)
        real = socket.getaddrinfo
        asked = []

        def stub(host, *args, **kw):
            text = host.decode() if isinstance(host, bytes) else str(host)
            if text != "localhost":
                try:
                    import ipaddress
                    ipaddress.ip_address(text.split("%")[0])
                except ValueError:
                    asked.append(text)
                    raise socket.gaierror(-2, "Name or service not known")
            return real(host, *args, **kw)
        socket.getaddrinfo = stub
        self.addCleanup(setattr, socket, "getaddrinfo", real)
        return asked

    def blob_path(self, digest):
        return os.path.join(self.home, "blobs", "sha256", digest.split(":")[1])

    def cli_args(self, *argv):
        return ("--home", self.home, "--platform", "linux/amd64") + argv

    @staticmethod
    def without_progress(err):
        """stderr without its progress lines (a line per finished blob, a total every 10 s),
        which a pull prints where stderr is no terminal."""
        binary = isinstance(err, bytes)
        text = err.decode("utf-8", "replace") if binary else err
        kept = "".join(ln for ln in text.splitlines(True) if not PROGRESS_LINE.match(ln))
        return kept.encode() if binary else kept

    def assertOneErrorLine(self, err):
        err = self.without_progress(err)
        self.assertTrue(err.startswith("registry_pull: error: "), err)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("internal error", err)

    def error_line(self, err):
        """The error line that ends stderr (warnings, e.g. retries, may come before it)."""
        self.assertTrue(err.endswith("\n"), err)
        last = err.splitlines()[-1]
        self.assertTrue(last.startswith("registry_pull: error: "), err)
        self.assertNotIn("Traceback", err)
        self.assertNotIn("internal error", err)
        return last

    def child(self, *argv, timeout=50):
        """The CLI in a subprocess: (code, stdout without the RSS line, stderr, peak RSS MB, CPU seconds)."""
        if not os.path.exists("/proc/self/status"):
            self.skipTest("needs /proc/self/status (Linux) to read the child's peak RSS")
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.Popen([sys.executable, "-c", _CHILD] + list(argv), cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(end_process, proc)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            self.fail("the pull took more than %d s (killed)" % timeout)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        lines = out.decode().splitlines()
        peak = int(lines[-1]) / 1024 if lines and lines[-1].isdigit() else -1.0
        return proc.returncode, "\n".join(lines[:-1]), err.decode("utf-8", "replace"), peak, cpu


REGISTRY_BIN = shutil.which("docker-registry") or shutil.which("registry")
SKOPEO = shutil.which("skopeo")
OPENSSL = shutil.which("openssl")
HTPASSWD = shutil.which("htpasswd")
NEED_REAL = "needs the CNCF Distribution registry (Debian: docker-registry) and skopeo; .ci/run installs them"
UMOCI = shutil.which("umoci")
ZSTD = shutil.which("zstd")
BUILDAH = shutil.which("buildah")
SETPRIV = shutil.which("setpriv")
UNSHARE = shutil.which("unshare")
NOBODY = 65534
IS_ROOT = os.geteuid() == 0


def static_busybox():
    """busybox-static's binary (a dynamically linked busybox cannot run in a scratch image), or None."""
    for path in ("/bin/busybox", "/usr/bin/busybox"):
        try:
            with open(path, "rb") as f:
                head = f.read(64)
                if head[:4] != b"\x7fELF" or head[4] != 2:  # 64-bit ELF
                    continue
                end = "<" if head[5] == 1 else ">"
                phoff, = struct.unpack(end + "Q", head[32:40])
                phentsize, phnum = struct.unpack(end + "HH", head[54:58])
                f.seek(phoff)
                table = f.read(phentsize * phnum)
        except (OSError, struct.error):
            continue
        if all(struct.unpack(end + "I", table[i:i + 4])[0] != 3 for i in range(0, len(table), phentsize)):
            return path  # no PT_INTERP: statically linked
    return None


BUSYBOX = static_busybox()
NEED_BUILDAH = ("needs root, buildah, umoci and a static busybox (Debian: buildah umoci busybox-static); "
                ".ci/run installs them")


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def attestation_for(img):
    """A real buildx-style attestation manifest for ``img`` (in-toto layer, unknown/unknown)."""
    statement = json.dumps({"_type": "https://in-toto.io/Statement/v0.1", "subject": [
        {"digest": {"sha256": img.digest.split(":")[1]}}]}).encode()
    config = json.dumps({"architecture": "unknown", "os": "unknown", "config": {},
                         "rootfs": {"type": "layers", "diff_ids": [sha256(statement)]}}).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_MANIFEST,
                           "config": {"mediaType": rp.MT_OCI_CONFIG, "digest": sha256(config), "size": len(config)},
                           "layers": [{"mediaType": "application/vnd.in-toto+json", "digest": sha256(statement),
                                       "size": len(statement)}]}).encode()
    return manifest, {sha256(config): config, sha256(statement): statement, sha256(manifest): manifest}


def write_oci_layout(path, tag, images, with_index=False):
    """An OCI image layout with ``images`` under ``tag`` (an index with attestations if with_index)."""
    os.makedirs(os.path.join(path, "blobs", "sha256"), exist_ok=True)
    blobs = {}
    for img in images:
        blobs.update(img.blobs())
        blobs[img.digest] = img.manifest
    if with_index:
        entries = []
        for img in images:
            plat = {"os": "linux", "architecture": img.arch}
            if img.variant:
                plat["variant"] = img.variant
            entries.append({"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
                            "platform": plat})
            att, att_blobs = attestation_for(img)
            blobs.update(att_blobs)
            entries.append({"mediaType": rp.MT_OCI_MANIFEST, "digest": sha256(att), "size": len(att),
                            "platform": {"os": "unknown", "architecture": "unknown"},
                            "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                            "vnd.docker.reference.digest": img.digest}})
        top = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": entries}).encode()
        blobs[sha256(top)] = top
        desc = {"mediaType": rp.MT_OCI_INDEX, "digest": sha256(top), "size": len(top)}
    else:
        img = images[0]
        desc = {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest)}
    for digest, data in blobs.items():
        with open(os.path.join(path, "blobs", "sha256", digest.split(":")[1]), "wb") as f:
            f.write(data)
    desc["annotations"] = {"org.opencontainers.image.ref.name": tag}
    with open(os.path.join(path, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    return desc["digest"]


def make_ca(directory, critical=True):
    """A CA and a server certificate for 127.0.0.1/localhost, made with openssl (``critical``:
    the CA's basicConstraints marked critical, which OpenSSL's strict mode requires)."""
    def run(*args):
        subprocess.run(["openssl"] + list(args), check=True, cwd=directory,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(os.path.join(directory, "ca.ext"), "w") as f:
        f.write("basicConstraints=%sCA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n"
                "subjectKeyIdentifier=hash\n" % ("critical," if critical else ""))
    with open(os.path.join(directory, "leaf.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost,DNS:registry.invalid\n"
                "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n")
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.csr", "-subj", "/CN=rp test CA")
    run("x509", "-req", "-in", "ca.csr", "-signkey", "ca.key", "-out", "ca.pem", "-days", "2", "-extfile", "ca.ext")
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "leaf.ext")
    return os.path.join(directory, "ca.pem"), os.path.join(directory, "server.pem"), os.path.join(directory, "server.key")


class CuttingRelay:
    """A TCP relay on 127.0.0.1 in front of ``upstream`` (host:port) that cuts one request's body:
    the first whose request line ``which(line)`` accepts gets its headers and half its body
    forwarded, then both connections are closed, as a lost link would. Stopped at cleanup."""

    def __init__(self, case, upstream, which):
        self.upstream, self.which, self.lines, self.cut = upstream, which, [], False
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.2)
        self.host = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.stop = threading.Event()
        case.addCleanup(self.stop.set)
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while not self.stop.is_set():
            try:
                client, _ = self.sock.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self.serve, args=(client,), daemon=True).start()
        self.sock.close()

    def serve(self, client):
        host, port = self.upstream.split(":")
        up = socket.create_connection((host, int(port)), timeout=30)
        client.settimeout(30)

        def back():
            try:
                for data in iter(lambda: up.recv(65536), b""):
                    client.sendall(data)
            except OSError:
                pass
            for s in (client, up):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        threading.Thread(target=back, daemon=True).start()
        buf = b""
        try:
            while not self.stop.is_set():
                while b"\r\n\r\n" not in buf:
                    data = client.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                line = head.split(b"\r\n")[0].decode("latin-1")
                self.lines.append(line)
                length = next((int(v) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:])
                               if k.strip().lower() == b"content-length"), 0)
                cut = not self.cut and self.which(line) and length > 1
                self.cut = self.cut or cut
                up.sendall(head + b"\r\n\r\n")
                left = length // 2 if cut else length
                while left:
                    if not buf:
                        buf = client.recv(min(65536, left))
                        if not buf:
                            return
                    part, buf = buf[:left], buf[left:]
                    up.sendall(part)
                    left -= len(part)
                if cut:
                    time.sleep(0.3)  # what was sent reaches the registry, then the link is gone
                    return
        except OSError:
            pass
        finally:
            client.close()
            up.close()


class Distribution:
    """The real CNCF Distribution registry on 127.0.0.1, with a generated config."""

    def __init__(self, case, tls=None, htpasswd=None, silly_realm=None, proxy_of=None, client_ca=None,
                 access_log=False):
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="rp-dist-")
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.port = free_port()
        self.host = "127.0.0.1:%d" % self.port
        self.tls = tls
        http_cfg = {"addr": self.host}
        if tls:
            http_cfg["tls"] = {"certificate": tls[1], "key": tls[2]}
            if client_ca:  # mTLS: a client certificate signed by this CA, or no connection
                http_cfg["tls"]["clientcas"] = [client_ca]
        # access_log: one line per request in the log file (requests() reads them back).
        config = {"version": 0.1, "log": {"level": "error", "accesslog": {"disabled": not access_log}},
                  "storage": {"filesystem": {"rootdirectory": os.path.join(self.dir, "data")},
                              "delete": {"enabled": True}},
                  "http": http_cfg}
        if htpasswd:
            config["auth"] = {"htpasswd": {"realm": "test-realm", "path": htpasswd}}
        elif silly_realm:
            config["auth"] = {"silly": {"realm": silly_realm, "service": "test-registry"}}
        if proxy_of:
            config["proxy"] = {"remoteurl": proxy_of}
        path = os.path.join(self.dir, "config.yml")
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        self.log = open(os.path.join(self.dir, "log"), "wb")
        case.addCleanup(self.log.close)
        # Distribution reads REGISTRY_* variables as config overrides (REGISTRY_AUTH_FILE!).
        env = dict((k, v) for k, v in os.environ.items() if not k.startswith("REGISTRY_"))
        self.proc = subprocess.Popen([REGISTRY_BIN, "serve", path], stdout=self.log, stderr=self.log, env=env)
        case.addCleanup(self.stop)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with contextlib.closing(socket.create_connection(("127.0.0.1", self.port), timeout=1)):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        with open(os.path.join(self.dir, "log"), "rb") as f:
            raise RuntimeError("docker-registry did not start: %r" % f.read()[-500:])

    def requests(self, method=None, contains=""):
        """(method, path, status) of the requests the access log shows (Distribution(access_log=True)), in order."""
        self.log.flush()
        with open(os.path.join(self.dir, "log"), "rb") as f:
            lines = f.read().decode("utf-8", "replace").splitlines()
        found = []
        for line in lines:
            m = re.search(r'"([A-Z]+) (\S+) HTTP/[\d.]+" (\d{3}) ', line)
            if m and (method is None or m.group(1) == method) and contains in m.group(2):
                found.append((m.group(1), m.group(2), int(m.group(3))))
        return found

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def push(self, name, images, tag="v1", with_index=False, docker_format=False, creds=None, cert_dir=None):
        layout = tempfile.mkdtemp(prefix="rp-layout-")
        self.case.addCleanup(shutil.rmtree, layout, True)
        write_oci_layout(layout, tag, images, with_index)
        cmd = [SKOPEO, "--insecure-policy", "copy", "-q", "--dest-tls-verify=false"]
        if with_index:
            cmd.append("--all")
        if docker_format:
            cmd += ["--format", "v2s2"]
        if creds:
            cmd += ["--dest-creds", creds]
        if cert_dir:
            cmd += ["--dest-cert-dir", cert_dir]
        cmd += ["oci:%s:%s" % (layout, tag), "docker://%s/%s:%s" % (self.host, name, tag)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        if proc.returncode != 0:
            raise RuntimeError("skopeo copy failed: %s" % proc.stderr.decode()[-800:])


class ForwardProxy:
    """An HTTP proxy on 127.0.0.1: forwards absolute-URI requests and tunnels CONNECT, for the
    made-up host names in ``routes`` (name:port -> 127.0.0.1:port)."""

    def __init__(self, routes, allow_connect=True):
        self.routes, self.allow_connect, self.log = routes, allow_connect, []

    def start(self, case):
        proxy = self

        class Handler(QuietHandler):
            def do_CONNECT(self):
                proxy.log.append(("CONNECT", self.path))
                backend = proxy.routes.get(self.path)
                if not backend or not proxy.allow_connect:
                    self.send_response(405 if backend else 502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                upstream = socket.create_connection(backend.split(":"))
                self.send_response(200, "Connection established")
                self.end_headers()
                self.close_connection = True
                sockets = [self.connection, upstream]

                def pipe(a, b):
                    try:
                        while True:
                            data = a.recv(65536)
                            if not data:
                                break
                            b.sendall(data)
                    except OSError:
                        pass
                    finally:
                        for s in sockets:
                            try:
                                s.shutdown(socket.SHUT_RDWR)
                            except OSError:
                                pass
                t = threading.Thread(target=pipe, args=(upstream, self.connection), daemon=True)
                t.start()
                pipe(self.connection, upstream)
                t.join(5)
                upstream.close()

            def forward(self):
                parts = urllib.parse.urlsplit(self.path)
                proxy.log.append((self.command, self.path))
                backend = proxy.routes.get(parts.netloc)
                if parts.scheme != "http" or not backend:
                    self.send_response(502)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                import http.client as hc
                conn = hc.HTTPConnection(*backend.split(":"), timeout=30)
                headers = dict((k, v) for k, v in self.headers.items() if k.lower() not in ("proxy-connection",))
                conn.request(self.command, parts.path + ("?" + parts.query if parts.query else ""), headers=headers)
                resp = conn.getresponse()
                body = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)
                conn.close()

            do_GET = do_HEAD = forward

        self.server, host = serve(case, Handler)
        self.url = "http://" + host
        return self


def count_connections(reg):
    """Count the TCP connections the in-process registry accepts from now on."""
    count = [0]
    real = reg.server.get_request

    def get_request():
        count[0] += 1
        return real()
    reg.server.get_request = get_request
    return count


def slow_blob(reg, digest, stall=None, chunk=65536, delay=0.02):
    """A fault that serves ``digest`` slowly (honouring Range); with ``stall`` (an Event) it
    sends one chunk and then waits on the event, as a stalled server would."""
    def fault(h, method, path):
        if not (path.endswith(digest) and method == "GET"):
            return False
        data = reg.blobs[digest]
        m = re.match(r"^bytes=(\d+)-$", h.headers.get("Range") or "")
        start = int(m.group(1)) if m else 0
        h.send_response(206 if start else 200)
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
        h.end_headers()
        try:
            for pos in range(start, len(data), chunk):
                h.wfile.write(data[pos:pos + chunk])
                h.wfile.flush()
                if stall is not None:
                    stall.wait(60)
                    break
                time.sleep(delay)
        except (BrokenPipeError, ConnectionResetError):
            pass
        h.close_connection = True
        return True
    return fault


def wait_for(predicate, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def end_process(proc):
    """Kill ``proc`` if it still runs, reap it and close its pipes (a cleanup)."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream:
            stream.close()


def tar_layer(entries, compress="gzip"):
    """A layer from (name, kind, payload, mode) entries; kind: file, dir, symlink, link, fifo."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, payload, mode in entries:
            info = tarfile.TarInfo(name)
            info.mode, info.mtime = mode, 1600000000 + len(name)
            if name.startswith("owned"):
                info.uid, info.gid = 1234, 5678
            data = None
            if kind == "file":
                data = payload
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, payload
            elif kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, payload
            elif kind == "fifo":
                info.type = tarfile.FIFOTYPE
            elif kind == "chr":
                info.type, info.devmajor, info.devminor = tarfile.CHRTYPE, 1, 3
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    raw = buf.getvalue()
    if compress == "gzip":
        blob = gzip.compress(raw, mtime=0)
    elif compress == "zstd":
        blob = subprocess.run([ZSTD, "-q", "-c"], input=raw, stdout=subprocess.PIPE, check=True).stdout
    else:
        blob = raw
    return blob, sha256(raw)


LAYER_TYPE = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
              "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
              None: "application/vnd.oci.image.layer.v1.tar"}


def layered_image(*layers, compress="gzip"):
    img = Image(layers=[tar_layer(entries, compress) for entries in layers])
    if compress != "gzip":
        img.edit(manifest=lambda doc: [x.update(mediaType=LAYER_TYPE[compress]) for x in doc["layers"]])
    return img


ROOTFS_LAYERS = [
    [("a", "dir", None, 0o755), ("a/x", "file", b"x1", 0o644), ("a/y", "file", b"y1", 0o600),
     ("b", "dir", None, 0o750), ("b/z", "file", b"z1", 0o644), ("c", "dir", None, 0o755),
     ("c/1", "file", b"c1", 0o644), ("c/sub", "dir", None, 0o755), ("c/sub/deep", "file", b"d", 0o644),
     ("usr", "dir", None, 0o755), ("usr/lib", "dir", None, 0o755), ("lib", "symlink", "usr/lib", 0o777),
     ("bin", "dir", None, 0o755), ("bin/tool", "file", b"#!/bin/sh\n", 0o4755),
     ("bin/hard", "link", "bin/tool", 0o4755), ("s1", "symlink", "s2", 0o777),
     ("s2", "symlink", "bin/tool", 0o777), ("abs", "symlink", "/etc/passwd", 0o777),
     ("ro", "dir", None, 0o555), ("ro/f", "file", b"in a read-only dir", 0o444),
     ("fifo", "fifo", None, 0o644), ("owned", "file", b"mine", 0o640)],
    [("a/.wh.x", "file", b"", 0o644), ("c/.wh..wh..opq", "file", b"", 0o644), ("c/2", "file", b"c2", 0o644),
     ("lib/libfoo.so", "file", b"foo", 0o755), ("b/z", "file", b"z2", 0o640)],
    [("a/.wh.y", "file", b"", 0o644), ("a/x", "file", b"x3", 0o644), ("b/w", "file", b"w3", 0o644),
     ("c/3", "file", b"c3", 0o644), (".wh.s1", "file", b"", 0o644), ("c/sub", "dir", None, 0o700)],
]


def snapshot(root):
    """(path, type, mode, link target or content) for every entry below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            if os.geteuid() == 0:  # ownership is restored only by root
                out["owner:" + rel] = (st.st_uid, st.st_gid)
            import stat as st_mod
            if st_mod.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", os.readlink(path))
            elif st_mod.S_ISDIR(st.st_mode):
                out[rel] = ("dir", oct(st.st_mode & 0o7777))
            elif st_mod.S_ISFIFO(st.st_mode):
                out[rel] = ("fifo", oct(st.st_mode & 0o7777))
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", oct(st.st_mode & 0o7777), f.read(), int(st.st_mtime), st.st_nlink)
    return out


# One layer per step (buildah build --layers): COPY makes the base, the first RUN the world, the
# second rewrites it as users do, the third changes metadata and replaces more.
CONTAINERFILE = r"""FROM scratch
COPY base/ /
RUN set -e; \
    mkdir -p /gone/deep /gone/ro /opt/app/bin /d2f/child /x/sub/s /hl /real /home/u /shared /tmp /var /run /keep; \
    echo g > /gone/deep/f; echo r > /gone/ro/f; chmod 0555 /gone/ro; chmod 0700 /gone; \
    echo a > /opt/app/bin/run; chmod 0750 /opt/app; chmod 0700 /opt/app/bin; \
    echo c > /d2f/child/f; chmod 0700 /d2f/child; chmod 0751 /d2f; \
    echo o > /x/old; echo s > /x/sub/s/f; chmod 0711 /x/sub; chmod 0700 /x/sub/s; \
    echo h > /hl/a; ln /hl/a /hl/b; \
    ln -s /real /link; ln -s /run /var/run; \
    echo x > /home/u/f; ln -s f /home/u/l; chown -R 1000:1001 /home/u; chown -h 1002:1003 /home/u/l; \
    echo u > /suid; chmod 4755 /suid; echo g > /sgid; chmod 2711 /sgid; \
    echo o > /owned-suid; chown 4242:4243 /owned-suid; chmod 6750 /owned-suid; \
    chmod 2775 /shared; chmod 1777 /tmp; \
    mkfifo /fifo; mkfifo -m 0600 /run/fifo2; \
    echo file > /f2d; echo k > /keep/k; chmod 0555 /keep
RUN set -e; \
    rm -rf /gone; \
    mv /opt/app /opt/app-1; ln -s /opt/app-1 /opt/app; \
    rm -rf /d2f; echo file > /d2f; \
    rm -rf /x; mkdir /x; echo n > /x/new; \
    ln /hl/a /hl/c; echo more >> /hl/a; \
    echo w > /link/through; echo 1 > /var/run/pid; \
    rm /f2d; mkdir -p /f2d/now/a/dir; chmod 0705 /f2d/now
RUN set -e; \
    chown -R 2000:2001 /shared; chmod 2770 /shared; chmod 0700 /opt/app-1; \
    chown 4242:4243 /suid; chmod 4711 /suid; \
    rm /link; mkdir /link; echo d > /link/dir-now; \
    rm -rf /real; ln -s /opt/app-1/bin /real; echo r2 > /real/via-link
"""

BASE_TOOLS = ("sh", "rm", "mv", "ln", "mkdir", "chown", "chmod", "mkfifo", "cp", "echo", "cat")


def _run(cmd, what, timeout=300, **kw):
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout, **kw)
    if proc.returncode != 0:
        raise RuntimeError("%s failed (exit %d): %s" % (what, proc.returncode,
                                                        proc.stdout.decode(errors="replace")[-1500:]))
    return proc.stdout


def _unmount_below(path):
    """Unmount anything left mounted below ``path`` (an overlay build that died half-way)."""
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        return
    for point in sorted(points, key=len, reverse=True):
        if point == path or point.startswith(path + "/"):
            subprocess.call(["umount", "-l", point], stderr=subprocess.DEVNULL)


def _private_state(workdir):
    """A command prefix running buildah in its own mount namespace with a tmpfs over the state it
    writes outside --root/--runroot: as root, containers/image keeps a blob-info cache in
    /var/lib/containers/cache (no flag or variable moves it) and the network code makes
    /run/containers/networks. The overlay driver's mounts die with the namespace too."""
    if not UNSHARE:
        return []
    points = ["/var/lib/containers" if os.path.isdir("/var/lib/containers") else "/var/lib"]
    if os.path.isdir("/run/containers"):
        points.append("/run/containers")
    points = [p for p in points if not (workdir + "/").startswith(p + "/")]
    script = " && ".join(["mount -t tmpfs -o mode=0755 rp-test %s" % shlex.quote(p) for p in points] + ['exec "$@"'])
    return [UNSHARE, "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh"]


def buildah_layout(workdir, driver, tag="v1"):
    """Build CONTAINERFILE with buildah (chroot isolation, private storage, ``driver``) and push it
    into an OCI image layout; returns (layout, tag, seconds). RuntimeError carries buildah's words."""
    ctx = os.path.join(workdir, "ctx")
    os.makedirs(os.path.join(ctx, "base", "bin"))
    shutil.copy2(BUSYBOX, os.path.join(ctx, "base", "bin", "busybox"))
    for tool in BASE_TOOLS:
        os.symlink("busybox", os.path.join(ctx, "base", "bin", tool))
    with open(os.path.join(ctx, "Containerfile"), "w") as f:
        f.write(CONTAINERFILE)
    storage = os.path.join(workdir, "storage")
    conf = {
        # Nothing from /etc/containers: its storage.conf may name another driver or a
        # mount_program, its policy.json may be missing.
        "storage.conf": '[storage]\ndriver = "%s"\ngraphroot = "%s/root"\nrunroot = "%s/run"\n'
                        % (driver, storage, storage),
        "policy.json": json.dumps({"default": [{"type": "insecureAcceptAnything"}]}),
        "containers.conf": "",
        "registries.conf": "",
    }
    for name, text in conf.items():
        with open(os.path.join(workdir, name), "w") as f:
            f.write(text)
    os.makedirs(os.path.join(workdir, "tmp"))
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": workdir,
           "TMPDIR": os.path.join(workdir, "tmp"), "BUILDAH_ISOLATION": "chroot",
           "CONTAINERS_STORAGE_CONF": os.path.join(workdir, "storage.conf"),
           "CONTAINERS_CONF": os.path.join(workdir, "containers.conf"),
           "CONTAINERS_REGISTRIES_CONF": os.path.join(workdir, "registries.conf")}
    base = _private_state(workdir) + [BUILDAH, "--root", os.path.join(storage, "root"),
                                      "--runroot", os.path.join(storage, "run"), "--storage-driver", driver]
    policy = ["--signature-policy", os.path.join(workdir, "policy.json")]
    layout = os.path.join(workdir, "layout")
    start = time.monotonic()
    try:
        _run(base + ["build", "--layers", "--isolation", "chroot", "--pull=never"] + policy +
             ["-f", os.path.join(ctx, "Containerfile"), "-t", "localhost/rp-real:" + tag, ctx],
             "buildah build (%s driver)" % driver, env=env, cwd=workdir)
        _run(base + ["push", "-q"] + policy + ["localhost/rp-real:" + tag, "oci:%s:%s" % (layout, tag)],
             "buildah push (%s driver)" % driver, env=env, cwd=workdir)
    finally:
        _unmount_below(storage)
    return layout, tag, time.monotonic() - start


def layout_manifest(layout, tag):
    """(media type, bytes, document) of the manifest tagged ``tag`` in an OCI image layout."""
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    desc = [m for m in index["manifests"]
            if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
    with open(os.path.join(layout, "blobs", "sha256", desc["digest"].split(":")[1]), "rb") as f:
        data = f.read()
    return desc["mediaType"], data, json.loads(data)


def push_layout(reg, layout, tag, repo):
    """Serve ``tag`` of an OCI image layout from the in-process Registry as ``repo:tag``."""
    media_type, data, _ = layout_manifest(layout, tag)
    blobs = os.path.join(layout, "blobs", "sha256")
    for name in os.listdir(blobs):
        with open(os.path.join(blobs, name), "rb") as f:
            reg.blobs["sha256:" + name] = f.read()
    reg.manifests[(repo, tag)] = (media_type, data)
    reg.manifests[(repo, sha256(data))] = (media_type, data)


def layer_members(layout, tag):
    """[{name: TarInfo} per layer] of ``tag`` in an OCI image layout."""
    _, _, manifest = layout_manifest(layout, tag)
    layers = []
    for desc in manifest["layers"]:
        with tarfile.open(os.path.join(layout, "blobs", "sha256", desc["digest"].split(":")[1]), "r:*") as tar:
            layers.append(dict((m.name.rstrip("/"), m) for m in tar.getmembers()))
    return layers


def tree(root, owners=True):
    """(entries, hard-link groups) below ``root``, never following a symlink: entries maps each
    path to its type, mode (with set-id and sticky bits), owner, mtime (whole seconds, directories
    too), size and content hash (files), target (symlinks); groups lists the paths sharing an inode."""
    entries, inodes = {}, {}
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
             stat.S_IFCHR: "char", stat.S_IFBLK: "block", stat.S_IFSOCK: "socket"}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = kinds.get(stat.S_IFMT(st.st_mode), oct(stat.S_IFMT(st.st_mode)))
            e = {"type": kind, "mtime": int(st.st_mtime)}
            if kind != "symlink":  # a symlink's mode is 0777 on Linux whatever the layer says
                e["mode"] = "%04o" % stat.S_IMODE(st.st_mode)
            if owners:
                e["owner"] = "%d:%d" % (st.st_uid, st.st_gid)
            if kind == "file":
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(65536), b""):
                        h.update(chunk)
                e["size"], e["sha256"] = st.st_size, h.hexdigest()[:16]
                if st.st_nlink > 1:
                    inodes.setdefault((st.st_dev, st.st_ino), []).append(rel)
            elif kind == "symlink":
                e["target"] = os.readlink(path)
            elif kind in ("char", "block"):
                e["rdev"] = "%d,%d" % (os.major(st.st_rdev), os.minor(st.st_rdev))
            entries[rel] = e
    return entries, sorted(sorted(g) for g in inodes.values() if len(g) > 1)


def tree_diff(ours, theirs, names=("registry_pull", "umoci")):
    """How two tree() results differ, one readable line each; [] when they are the same."""
    (mine, my_groups), (other, other_groups) = ours, theirs
    lines = []
    for path in sorted(set(mine) | set(other)):
        a, b = mine.get(path), other.get(path)
        if a is None or b is None:
            lines.append("%s: only in %s %s" % (path, names[a is None], a or b))
            continue
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                lines.append("%s: %s %s=%r %s=%r" % (path, key, names[0], a.get(key), names[1], b.get(key)))
    if my_groups != other_groups:
        lines.append("hard-link groups: %s=%s %s=%s" % (names[0], my_groups, names[1], other_groups))
    return lines


class TreeAssertions:
    def assertSameTree(self, ours, theirs, names=("registry_pull", "umoci")):
        diffs = tree_diff(ours, theirs, names)
        if diffs:
            self.fail("%s's rootfs differs from %s's in %d way%s:\n  %s" % (
                names[0], names[1], len(diffs), "" if len(diffs) == 1 else "s", "\n  ".join(diffs[:80])))

    def umoci_tree(self, layout, tag, bundle, owners=True):
        _run([UMOCI, "unpack"] + ([] if os.geteuid() == 0 else ["--rootless"]) +
             ["--image", "%s:%s" % (layout, tag), bundle], "umoci unpack")
        return tree(os.path.join(bundle, "rootfs"), owners)


def gnu_tar_extract(test, tar_path):
    """GNU tar's tree of ``tar_path`` (as root: owners, modes, xattrs), in a directory removed after ``test``."""
    out = tempfile.mkdtemp(prefix="rp-flat-")
    test.addCleanup(shutil.rmtree, out, True)
    proc = subprocess.run(["tar", "-xpPf", tar_path, "-C", out, "--numeric-owner", "--xattrs",
                           "--xattrs-include=*"], stderr=subprocess.PIPE)
    test.assertEqual(proc.returncode, 0, proc.stderr)
    return out


def read_terminal(fd):
    """Everything a program writes to the pseudo-terminal whose leader is ``fd``, until it closes it."""
    chunks = []
    while True:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the program closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def untimed_dirs(t):
    """A tree() without the times of its directories: make_layer lists none, so each extraction
    makes them when it runs (a second apart, now and then)."""
    return dict((k, dict((f, v) for f, v in e.items() if not (e["type"] == "dir" and f == "mtime")))
                for k, e in t[0].items()), t[1]


def host_state(path):
    """What a stray chmod, lchown, utime or write could change below ``path``, entry by entry."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(path):
        for p in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
            st = os.lstat(p)
            e = {"type": oct(stat.S_IFMT(st.st_mode)), "mode": "%05o" % stat.S_IMODE(st.st_mode),
                 "owner": "%d:%d" % (st.st_uid, st.st_gid), "mtime_ns": st.st_mtime_ns}
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    e["content"] = f.read()
            out[os.path.relpath(p, path)] = e
    return out


# The CLI in a child process; prints the child's peak RSS (kB, VmHWM: Linux carries ru_maxrss
# of the forking process across exec) on its last stdout line.
_CHILD = ("import re, sys, registry_pull as rp; code = rp.main(sys.argv[1:]); "
          "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(code)")


def as_nobody(argv):
    """``argv`` run as uid/gid 65534 with no supplementary groups (root only)."""
    return [SETPRIV, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"] + list(argv)


def victim_dir(case):
    """A root-only (0700) directory holding one file: what an attacker must not reach through us."""
    victim = tempfile.mkdtemp(prefix="rp-victim-")
    case.addCleanup(shutil.rmtree, victim, True)
    path = os.path.join(victim, "passwd")
    with open(path, "wb") as f:
        f.write(b"victim secret\n")
    os.chmod(path, 0o600)
    os.chmod(victim, 0o700)
    return victim


def raw_image(raw):
    """An image of one gzip layer made of the uncompressed tar bytes ``raw``."""
    return Image(layers=[(gzip.compress(raw, 6), sha256(raw))])


# Layer 1 makes etc/ and a file; its last entry says it is done.  Layer 2 whites out that file
# and writes etc/target: both through etc/, which is swapped for a symlink between the layers.
SWAP_LAYERS = [
    [("etc", "dir", None, 0o755), ("etc/passwd", "file", b"image passwd\n", 0o644),
     ("zz-layer1-done", "file", b"", 0o644)],
    [("etc/.wh.passwd", "file", b"", 0o644), ("etc/target", "file", b"written by layer 2\n", 0o644)],
]


def gnu_sparse_10_layer(segments):
    """A PAX member in GNU sparse 1.0 form whose map (at the start of its data) lists ``segments`` entries."""
    mapdata = b"%d\n" % segments + b"1099511627776\n0\n" * segments
    mapdata += b"\0" * (-len(mapdata) % 512)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("GNUSparseFile.0/f")
        info.size = len(mapdata)
        info.mode = 0o644
        info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "f",
                            "GNU.sparse.realsize": "1"}
        tar.addfile(info, io.BytesIO(mapdata))
    return buf.getvalue()


def old_gnu_sparse_layer(blocks):
    """An old GNU sparse member ('S') followed by ``blocks`` extension blocks of 21 segments each."""
    info = tarfile.TarInfo("f")
    info.type, info.mode, info.size = tarfile.GNUTYPE_SPARSE, 0o644, 0
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    header[482] = 1  # isextended
    header[483:495] = b"%011o\0" % 1  # realsize
    header[148:156] = b"        "
    header[148:156] = b"%06o\0 " % sum(header[:512])
    struct_ = b"%011o\0%011o\0" % (0o7777777777, 1)
    ext = struct_ * 21 + b"\0" * (504 - 21 * 24)
    more, last = ext + b"\1" + b"\0" * 7, ext + b"\0" * 8
    return bytes(header) + more * (blocks - 1) + last + b"\0" * 1024


def deep_layer(*names):
    """A layer of files each ``depth`` directories deep (no directory entries: all implied)."""
    return tar_layer([(name, "file", b"x", 0o644) for name in names])


def count_dirs(path):
    """Directories below ``path``, however deep (os.walk recurses, and paths pass PATH_MAX)."""
    out = subprocess.run(["find", path, "-mindepth", "1", "-type", "d"], stdout=subprocess.PIPE, timeout=30).stdout
    return out.count(b"\n")


CAP = 12.0  # seconds a test waits, at most, for a client that may hang


def run_cli(*argv, cap=CAP):
    """``python3 registry_pull.py ARGV`` in a subprocess, killed after ``cap`` s:
    (exit code, or None when it was still running; seconds taken; stderr)."""
    start = time.monotonic()
    try:
        p = subprocess.run([sys.executable, os.path.join(HERE, "registry_pull.py")] + list(argv),
                           stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=cap)
    except subprocess.TimeoutExpired as e:
        err = e.stderr or b""
        return None, time.monotonic() - start, err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    return p.returncode, time.monotonic() - start, p.stderr.decode("utf-8", "replace")


class RawServer:
    """A hand-written HTTP/1.1 server on 127.0.0.1, a thread per connection, for answers
    http.server cannot give. ``answer(conn, method, path, headers, server)`` writes what it
    likes and returns True to keep the connection for the next request. Everything stops at
    the test's cleanup, or after LIFETIME seconds whatever happens."""

    LIFETIME = 30.0

    def __init__(self, case, answer):
        self.answer = answer
        self.requests = []
        self.stop = threading.Event()
        self.until = time.monotonic() + self.LIFETIME
        self.conns = []
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(32)
        self.sock.settimeout(0.1)
        self.host = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()
        case.addCleanup(self.close)

    def alive(self):
        return not self.stop.is_set() and time.monotonic() < self.until

    def _accept(self):
        while self.alive():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        conn.settimeout(0.2)
        buf = b""
        try:
            while self.alive():
                try:
                    data = conn.recv(65536)
                except socket.timeout:
                    continue
                if not data:
                    return
                buf += data
                if buf[:1] == b"\x16":
                    return  # a TLS hello (the client's HTTPS probe on loopback): not spoken here
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    method, path = (lines[0].split(" ") + ["", ""])[:2]
                    headers = {}
                    for line in lines[1:]:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                    self.requests.append((method, path))
                    if not self.answer(conn, method, path, headers, self):
                        return
        except OSError:
            return
        finally:
            conn.close()

    @staticmethod
    def reply(conn, status, body=b"", headers=(), head=False):
        text = "HTTP/1.1 %s\r\n" % status + "".join("%s: %s\r\n" % kv for kv in headers)
        text += "Content-Length: %d\r\n\r\n" % len(body)
        conn.sendall(text.encode() + (b"" if head else body))
        return True

    def keep_sending(self, conn, pieces, interval):
        """Send each of ``pieces`` (an endless iterator) ``interval`` s apart until stopped or refused."""
        try:
            for piece in pieces:
                if not self.alive():
                    break
                conn.sendall(piece)
                time.sleep(interval)
        except OSError:
            pass
        return False

    def close(self):
        self.stop.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def endless(first, then):
    yield first
    n = 0
    while True:
        n += 1
        yield then(n)


def realm_row(home, host):
    with sqlite3.connect(os.path.join(home, "oci.db")) as conn:
        rows = conn.execute("SELECT challenge, realm FROM hosts WHERE host = ?", (host,)).fetchall()
    return rows[0] if rows else None


def store_files(home):
    d = os.path.join(home, "blobs", "sha256")
    return set(f for f in os.listdir(d) if re.fullmatch(r"[0-9a-f]{64}", f)) if os.path.isdir(d) else set()


def hexes(*digests):
    return set(d.split(":")[1] for d in digests)


WYCHEPROOF = os.path.join(HERE, "..", "shared", "testdata", "wycheproof", "ecdsa_secp256r1_sha256_test.json")
# A few of Project Wycheproof's ECDSA P-256 / SHA-256 cases (Apache 2.0), for where its folder is absent:
# (public key PEM, message hex, DER signature hex, valid, note).
WYCHEPROOF_CASES = [
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEBKrsc2NXJvIT+4qeZNo7hjLkFJWp\n"
        "RNAEW1IuunJA+tWH2TFXmKqjpboBd1eHztBeqve04J/IHW0apUboNl1SXQ==\n"
        "-----END PUBLIC KEY-----\n",
        "",
        "3045022100b292a619339f6e567a305c951c0dcbcc42d16e47f219f9e98e76e09d8770b34a02200177e60492c5a8242f"
        "76f07bfe3661bde59ec2a17ce5bd2dab2abebdf89a62e2",
        True,
        "wycheproof 0.9rc5 tcId 1 [ValidSignature] pseudorandom signature",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKSexBRK64+3c/kZ4KBKLrSkDJpkZ\n"
        "9whgacjE32xzKDjHeHlk6qwA5ZIfsUmKYPRgZ2az2WhQAVWNGpdOc0FRPg==\n"
        "-----END PUBLIC KEY-----\n",
        "313233343030",
        "30814502202ba3a8be6b94d5ec80a6d9d1190a436effe50d85a1eee859b8cc6af9bd5c2e18022100b329f479a2bbd0a5"
        "c384ee1493b1f5186a87139cac5df4087c134b49156847db",
        False,
        "wycheproof 0.9rc5 tcId 8 [BerEncodedSignature] length of sequence [r, s] uses long form encoding",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKSexBRK64+3c/kZ4KBKLrSkDJpkZ\n"
        "9whgacjE32xzKDjHeHlk6qwA5ZIfsUmKYPRgZ2az2WhQAVWNGpdOc0FRPg==\n"
        "-----END PUBLIC KEY-----\n",
        "313233343030",
        "308002202ba3a8be6b94d5ec80a6d9d1190a436effe50d85a1eee859b8cc6af9bd5c2e18022100b329f479a2bbd0a5c3"
        "84ee1493b1f5186a87139cac5df4087c134b49156847db0000",
        False,
        "wycheproof 0.9rc5 tcId 48 [BerEncodedSignature] indefinite length",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKSexBRK64+3c/kZ4KBKLrSkDJpkZ\n"
        "9whgacjE32xzKDjHeHlk6qwA5ZIfsUmKYPRgZ2az2WhQAVWNGpdOc0FRPg==\n"
        "-----END PUBLIC KEY-----\n",
        "313233343030",
        "30450220d45c5741946b2a137f59262ee6f5bc91001af27a5e1117a64733950642a3d1e8022100b329f479a2bbd0a5c3"
        "84ee1493b1f5186a87139cac5df4087c134b49156847db",
        False,
        "wycheproof 0.9rc5 tcId 155 [ModifiedInteger] replaced r by -r",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKSexBRK64+3c/kZ4KBKLrSkDJpkZ\n"
        "9whgacjE32xzKDjHeHlk6qwA5ZIfsUmKYPRgZ2az2WhQAVWNGpdOc0FRPg==\n"
        "-----END PUBLIC KEY-----\n",
        "313233343030",
        "3006020100020100",
        False,
        "wycheproof 0.9rc5 tcId 168 [InvalidSignature] Signature with special case values r=0 and s=0",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKSexBRK64+3c/kZ4KBKLrSkDJpkZ\n"
        "9whgacjE32xzKDjHeHlk6qwA5ZIfsUmKYPRgZ2az2WhQAVWNGpdOc0FRPg==\n"
        "-----END PUBLIC KEY-----\n",
        "313233343030",
        "3026020101022100ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551",
        False,
        "wycheproof 0.9rc5 tcId 179 [InvalidSignature] Signature with special case values r=1 and s=n",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEKSexBRK64+3c/kZ4KBKLrSkDJpkZ\n"
        "9whgacjE32xzKDjHeHlk6qwA5ZIfsUmKYPRgZ2az2WhQAVWNGpdOc0FRPg==\n"
        "-----END PUBLIC KEY-----\n",
        "3639383139",
        "3044022064a1aab5000d0e804f3e2fc02bdee9be8ff312334e2ba16d11547c97711c898e02206af015971cc30be6d1a2"
        "06d4e013e0997772a2f91d73286ffd683b9bb2cf4f1b",
        True,
        "wycheproof 0.9rc5 tcId 295 [EdgeCaseShamirMultiplication] Edge case for Shamir multiplication",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEtTPUaV3VuMXgd1flXm5Rb34siPoC\n"
        "OeI/YOjsB91w8ocbE07ljMWDJ4RWhj8zw6hdiB99SjmFAUPinU6vAJr+Rw==\n"
        "-----END PUBLIC KEY-----\n",
        "313233343030",
        "304402207fffffff800000007fffffffffffffffde737d56d38bcf4279dce5617e3192a8022055555555000000005555"
        "5555555555553ef7a8e48d07df81a693439654210c70",
        False,
        "wycheproof 0.9rc5 tcId 392 [PointDuplication,ArithmeticError] point at infinity during verify",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEJk15ag2rmzdtNO6m/il93hx7c+U5\n"
        "RLyWyPHopoULtsnPUwgCDu1GDGSd2uYdTvi7eZWBE/EGvvr08Yh20SpeZA==\n"
        "-----END PUBLIC KEY-----\n",
        "68656c6c6f2c20776f726c64",
        "3046022100ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632556022100ffffffff00000000"
        "ffffffffffffffffbce6faada7179e84f3b9cac2fc63254e",
        False,
        "wycheproof 0.9rc5 tcId 477 [ArithmeticError] r = 5 + n, x = 5 is invalid; r was not reduced mod n",
    ),
    (
        "-----BEGIN PUBLIC KEY-----\n"
        "MFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEziTJkDLVKsbq0jwK4+xo70HlGigf\n"
        "1FeAjIMTbX3M6Q6PehVLVR6fOcWSeTV6pJGypivevCu3hhOIP8cpNsBX4A==\n"
        "-----END PUBLIC KEY-----\n",
        "68656c6c6f2c20776f726c64",
        "3026020103022100ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc63254e",
        True,
        "wycheproof 0.9rc5 tcId 479 [ValidSignature] r = 3, x = n + 3 is the smallest possible x with a reduction",
    ),
]


class Artifact:
    """An OCI 1.1 artifact built in memory: an artifactType, the empty config, titled layers."""

    EMPTY = b"{}"

    def __init__(self, files, artifact_type="application/vnd.example.thing.v1", subject=None,
                 layer_type="application/vnd.example.file.v1", config=None, config_type=rp.MT_OCI_EMPTY,
                 annotations=None, with_artifact_type=True):
        self.files = dict(files)
        self.config = self.EMPTY if config is None else config
        self.blobs_ = {sha256(self.config): self.config}
        layers = []
        for name, data in self.files.items():
            self.blobs_[sha256(data)] = data
            layer = {"mediaType": layer_type, "digest": sha256(data), "size": len(data)}
            if name is not None:
                layer["annotations"] = {"org.opencontainers.image.title": name}
            layers.append(layer)
        doc = {"schemaVersion": 2, "mediaType": rp.MT_OCI_MANIFEST,
               "config": {"mediaType": config_type, "digest": sha256(self.config), "size": len(self.config)},
               "layers": layers}
        if with_artifact_type:
            doc["artifactType"] = artifact_type
        if subject is not None:
            doc["subject"] = subject
        if annotations:
            doc["annotations"] = annotations
        self.manifest = json.dumps(doc).encode()
        self.digest = sha256(self.manifest)
        self.artifact_type = artifact_type

    def blobs(self):
        return dict(self.blobs_)

    def descriptor(self):
        return {"mediaType": rp.MT_OCI_MANIFEST, "digest": self.digest, "size": len(self.manifest),
                "artifactType": self.artifact_type}


def serve_tags(reg, repo):
    """A fault answering the tag list of ``repo`` from the registry's manifests (other paths: None)."""
    def fault(h, method, path):
        if path != "/v2/%s/tags/list" % repo:
            return False
        tags = sorted(t for (r, t) in reg.manifests if r == repo and not t.startswith("sha256:"))
        h.send(200, json.dumps({"name": repo, "tags": tags}).encode(), {"Content-Type": "application/json"})
        return True
    return fault


def push_artifact(reg, repo, tag, art):
    reg.blobs.update(art.blobs())
    reg.manifests[(repo, art.digest)] = (rp.MT_OCI_MANIFEST, art.manifest)
    if tag:
        reg.manifests[(repo, tag)] = (rp.MT_OCI_MANIFEST, art.manifest)
    return art


class Keys:
    """ECDSA P-256 key pairs made with openssl, and signatures in cosign's exact layout."""

    def __init__(self, case):
        if not OPENSSL:
            case.skipTest("openssl is not installed")
        self.case = case
        self.dir = tempfile.mkdtemp(prefix="rp-keys-")
        case.addCleanup(shutil.rmtree, self.dir, True)
        self.n = 0

    def pair(self):
        self.n += 1
        key = os.path.join(self.dir, "k%d.pem" % self.n)
        pub = os.path.join(self.dir, "k%d.pub" % self.n)
        subprocess.run([OPENSSL, "ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", key], check=True)
        subprocess.run([OPENSSL, "ec", "-in", key, "-pubout", "-out", pub], check=True, stderr=subprocess.DEVNULL)
        return key, pub

    def sign(self, key, data):
        path = os.path.join(self.dir, "data-%d" % time.monotonic_ns())
        with open(path, "wb") as f:
            f.write(data)
        return subprocess.run([OPENSSL, "dgst", "-sha256", "-sign", key, path], check=True,
                              stdout=subprocess.PIPE).stdout

    def cosign(self, reg, repo, digest, key, identity, payload=None, signed_bytes=None, kind=None):
        """Push a cosign simple-signing signature of ``digest`` to tag sha256-HEX.sig."""
        if payload is None:
            payload = json.dumps({"critical": {"identity": {"docker-reference": identity},
                                               "image": {"docker-manifest-digest": digest},
                                               "type": kind or "cosign container image signature"},
                                  "optional": None}).encode()
        sig = self.sign(key, payload if signed_bytes is None else signed_bytes)
        config = json.dumps({"architecture": "", "os": "",
                             "rootfs": {"type": "layers", "diff_ids": [sha256(payload)]}}).encode()
        doc = {"schemaVersion": 2, "mediaType": rp.MT_OCI_MANIFEST,
               "config": {"mediaType": rp.MT_OCI_CONFIG, "digest": sha256(config), "size": len(config)},
               "layers": [{"mediaType": rp.MT_SIMPLESIGNING, "digest": sha256(payload), "size": len(payload),
                           "annotations": {"dev.cosignproject.cosign/signature": base64.b64encode(sig).decode()}}]}
        data = json.dumps(doc).encode()
        reg.blobs.update({sha256(config): config, sha256(payload): payload})
        tag = digest.replace(":", "-") + ".sig"
        reg.manifests[(repo, tag)] = (rp.MT_OCI_MANIFEST, data)
        reg.manifests[(repo, sha256(data))] = (rp.MT_OCI_MANIFEST, data)
        return sha256(data), data

    def bundle(self, key, digest, name, predicate="https://sigstore.dev/cosign/sign/v1"):
        """A sigstore bundle (v0.3) whose DSSE envelope, signed by ``key``, states that the image
        ``name`` (a repository) has ``digest``, with ``predicate`` as its predicateType."""
        statement = json.dumps({"_type": "https://in-toto.io/Statement/v1",
                                "subject": [{"name": name, "digest": {"sha256": digest.split(":")[1]}}],
                                "predicateType": predicate, "predicate": {}}).encode()
        kind = "application/vnd.in-toto+json"
        pae = b"DSSEv1 %d %s %d %s" % (len(kind), kind.encode(), len(statement), statement)
        sig = self.sign(key, pae)
        return json.dumps({"mediaType": rp.MT_SIGSTORE_BUNDLE, "dsseEnvelope": {
            "payload": base64.b64encode(statement).decode(), "payloadType": kind,
            "signatures": [{"sig": base64.b64encode(sig).decode()}]}}).encode()


def referrers_api(reg, page_size=None, ignore_filter=False):
    """A fault serving the OCI 1.1 referrers API from the registry's manifests (those with a subject)."""
    served = []

    def fault(h, method, path):
        m = re.match(r"^/v2/(.+)/referrers/(sha256:[0-9a-f]{64})$", path)
        if not m:
            return False
        repo, digest = m.groups()
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
        want = query.get("artifactType", [None])[0]
        entries = []
        for (r, ref), (mt, data) in sorted(reg.manifests.items()):
            if r != repo or not ref.startswith("sha256:"):
                continue
            doc = json.loads(data)
            if (doc.get("subject") or {}).get("digest") != digest:
                continue
            kind = doc.get("artifactType") or doc["config"]["mediaType"]
            if want and not ignore_filter and kind != want:
                continue
            entries.append({"mediaType": mt, "digest": ref, "size": len(data), "artifactType": kind,
                            "annotations": doc.get("annotations") or {}})
        start = int(query.get("last", ["0"])[0])
        headers = {"Content-Type": rp.MT_OCI_INDEX}
        page = entries[start:start + page_size] if page_size else entries
        if page_size and start + page_size < len(entries):
            headers["Link"] = '</v2/%s/referrers/%s?last=%d%s>; rel="next"' % (
                repo, digest, start + page_size, "&artifactType=" + want if want else "")
        if want and not ignore_filter:
            headers["OCI-Filters-Applied"] = "artifactType"
        served.append(path)
        h.send(200, json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": page}).encode(),
               headers)
        return True
    reg.fault = fault
    return served


def push_documents(host, repo, blobs, manifests):
    """Push blobs, then (reference, media type, bytes) manifests, to a plain-HTTP registry as the
    distribution spec says (POST an upload, PUT it with ?digest=; PUT each manifest)."""
    import http.client
    conn = http.client.HTTPConnection(host, timeout=30)
    try:
        for digest, data in blobs.items():
            conn.request("POST", "/v2/%s/blobs/uploads/" % repo, body=b"", headers={"Content-Length": "0"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 202, resp.status
            location = resp.getheader("Location")
            parts = urllib.parse.urlsplit(location)
            url = parts.path + "?" + (parts.query + "&" if parts.query else "") + "digest=" + digest
            conn.request("PUT", url, body=data, headers={"Content-Type": "application/octet-stream"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 201, (resp.status, digest)
        for ref, media_type, data in manifests:
            conn.request("PUT", "/v2/%s/manifests/%s" % (repo, ref), body=data, headers={"Content-Type": media_type})
            resp = conn.getresponse()
            body = resp.read()
            assert resp.status == 201, (resp.status, ref, body[:300])
    finally:
        conn.close()


def push_attested_index(reg, repo, tag, images):
    """``images`` and a buildx-style OCI index over them (a real attestation manifest after each image) in
    ``reg``; the index bytes."""
    entries = []
    for img in images:
        reg.push(repo, None, img)
        plat = {"os": "linux", "architecture": img.arch}
        if img.variant:
            plat["variant"] = img.variant
        entries.append({"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
                        "platform": plat})
        att, att_blobs = attestation_for(img)
        del att_blobs[sha256(att)]
        reg.blobs.update(att_blobs)
        reg.links.setdefault(repo, set()).update(att_blobs)
        reg.manifests[(repo, sha256(att))] = (rp.MT_OCI_MANIFEST, att)
        entries.append({"mediaType": rp.MT_OCI_MANIFEST, "digest": sha256(att), "size": len(att),
                        "platform": {"os": "unknown", "architecture": "unknown"},
                        "annotations": {"vnd.docker.reference.type": "attestation-manifest",
                                        "vnd.docker.reference.digest": img.digest}})
    data = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": entries}).encode()
    reg.manifests[(repo, tag)] = reg.manifests[(repo, sha256(data))] = (rp.MT_OCI_INDEX, data)
    return data


def headers_of(headers):
    """A logged request's headers with lower-case names."""
    return dict((k.lower(), v) for k, v in headers.items())


def query_of(path):
    return urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)


# --------------------------------------------------------------------------- the module itself


class StructureTests(unittest.TestCase):
    SOURCE = os.path.join(HERE, "registry_pull.py")

    def test_type_hints_of_every_public_name(self):
        """typing.get_type_hints works on every function and class in __all__ (as on 3.8)."""
        checked = 0
        for name in rp.__all__:
            obj = getattr(rp, name)
            if callable(obj):
                typing.get_type_hints(obj)
                checked += 1
        self.assertGreater(checked, 30)
        self.assertEqual(typing.get_type_hints(rp.pull)["return"], rp.PullResult)
        self.assertEqual(typing.get_type_hints(rp.PullResult)["platform"], rp.Platform)

    def test_no_type_comments_and_no_private_reach(self):
        """No '# type:' comments; no _name of another object used outside its own class."""
        with open(self.SOURCE, encoding="utf-8") as f:
            source = f.read()
        self.assertNotIn("# type:", source)
        found = []

        class Visit(ast.NodeVisitor):
            classes = []

            def visit_ClassDef(self, node):
                self.classes.append(node.name)
                self.generic_visit(node)
                self.classes.pop()

            def visit_Attribute(self, node):
                name, value = node.attr, node.value
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    own = isinstance(value, ast.Name) and (value.id in ("self", "cls") or
                                                           (self.classes and value.id == self.classes[-1]))
                    parent = isinstance(value, ast.Call) and getattr(value.func, "id", None) == "super"
                    documented = isinstance(value, ast.Name) and (value.id, name) in {("os", "_exit")}  # public API
                    if not (own or parent or documented):
                        found.append((node.lineno, name))
                self.generic_visit(node)
        Visit().visit(ast.parse(source))
        self.assertEqual(found, [])
        self.assertNotIn("TYPE_CHECKING", rp.__dict__)

    def test_version_and_changelog(self):
        self.assertRegex(rp.__version__, r"^\d+\.\d+\.\d+$")
        path = os.path.join(HERE, "CHANGELOG.md")
        if not os.path.exists(path):
            self.skipTest("CHANGELOG.md is not beside the module (a vendored copy)")
        with open(path, encoding="utf-8") as f:
            newest = next(ln for ln in f if ln.startswith("## "))
        self.assertIn(rp.__version__, newest)


TARINFO_FIELDS = ("name", "mode", "uid", "gid", "size", "mtime", "chksum", "type", "linkname", "uname", "gname",
                  "devmajor", "devminor")


def parsed_header(cls, buf):
    """What ``cls.frombuf`` makes of a header: its fields, or the exception's class."""
    try:
        info = cls.frombuf(buf, "utf-8", "surrogateescape")
    except Exception as e:
        return type(e).__name__
    return tuple(getattr(info, f) for f in TARINFO_FIELDS) + (getattr(info, "_sparse_structs", None),)


def sample_headers():
    """Headers as tar writers make them (ustar, GNU, PAX; long names split into the prefix, base-256
    numbers, device nodes, an old-style directory, a signed checksum) and broken ones."""
    out = []
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        for name, kind, extra in (("a/b.txt", tarfile.REGTYPE, {}), ("d/" * 40 + "f", tarfile.REGTYPE, {}),
                                  ("dir/", tarfile.DIRTYPE, {}), ("l", tarfile.SYMTYPE, {"linkname": "t/x"}),
                                  ("dev", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}),
                                  ("big", tarfile.REGTYPE, {"uid": 8 ** 8, "size": 8 ** 11 + 5}),
                                  ("\u00e9t\u00e9", tarfile.REGTYPE, {"uname": "\u00fc", "gname": "g"})):
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.mtime = kind, 0o4755, 1700000000
            for k, v in extra.items():
                setattr(info, k, v)
            try:
                data = info.tobuf(fmt, "utf-8", "surrogateescape")
            except ValueError:
                continue
            out += [data[i:i + 512] for i in range(0, len(data), 512)]
    v7 = bytearray(out[0])
    v7[0:100] = b"olddir/".ljust(100, b"\0")
    v7[156:157] = b"\0"
    v7[148:156] = b"        "
    v7[148:156] = b"%06o\0 " % (sum(v7))
    signed = bytearray(out[0])
    signed[300] = 0xE9  # high bit set: the signed sum differs from the unsigned one
    signed[148:156] = b"        "
    signed[148:156] = b"%06o\0 " % (256 + sum(b - 256 if b > 127 else b for b in signed) - 256)
    out += [bytes(v7), bytes(signed), b"\0" * 512, b"", out[0][:300], bytes(range(256)) * 2,
            out[0][:148] + b"12345678" + out[0][156:], out[0][:100] + b"0009\0\0\0\0" + out[0][108:]]
    return out


# --------------------------------------------------------------------------- references and platforms


class ReferenceTests(unittest.TestCase):
    GOOD = [
        ("alpine", ("docker.io", "library/alpine", "latest", None)),
        ("library/alpine:3.20", ("docker.io", "library/alpine", "3.20", None)),
        ("docker.io/alpine", ("docker.io", "library/alpine", "latest", None)),
        ("index.docker.io/library/alpine:edge", ("docker.io", "library/alpine", "edge", None)),
        ("user/repo", ("docker.io", "user/repo", "latest", None)),
        ("ghcr.io/owner/image:v1.2.3", ("ghcr.io", "owner/image", "v1.2.3", None)),
        ("localhost/foo", ("localhost", "foo", "latest", None)),
        ("localhost:5000/a/b/c:tag", ("localhost:5000", "a/b/c", "tag", None)),
        ("127.0.0.1:5000/x", ("127.0.0.1:5000", "x", "latest", None)),
        ("[::1]:5000/x:y", ("[::1]:5000", "x", "y", None)),
        ("Registry.Example.COM/a", ("Registry.Example.COM", "a", "latest", None)),
        ("quay.io/a_b/c__d/e-f--g.h:T_1.x", ("quay.io", "a_b/c__d/e-f--g.h", "T_1.x", None)),
        ("alpine@sha256:" + "a" * 64, ("docker.io", "library/alpine", None, "sha256:" + "a" * 64)),
        ("r.io/a:t@sha256:" + "b" * 64, ("r.io", "a", "t", "sha256:" + "b" * 64)),
        ("r.io/a@sha512:" + "c" * 128, ("r.io", "a", None, "sha512:" + "c" * 128)),
        ("foo:5000", ("docker.io", "library/foo", "5000", None)),  # one component: a tag, not a port
    ]
    BAD = [
        ("", "empty"),
        ("Alpine", "lowercase"),
        ("docker.io/Library/alpine", "lowercase"),
        ("alpine:", "tag"),
        ("alpine:-x", "tag"),
        ("alpine:" + "t" * 129, "tag"),
        ("a//b", "characters"),
        ("a/b/", "characters"),
        ("-a", "characters"),
        ("a..b", "characters"),
        ("a b", "white space"),
        ("r.io:0/a", "port"),
        ("r.io:65536/a", "port"),
        ("r.io:99999999999/a", "port"),
        ("r.io:abc/a", "host"),
        ("r_io.com/a", "host"),
        ("[::zz]:5000/a", "IPv6"),
        ("alpine@sha256:abc", "digest"),
        ("alpine@sha256:" + "A" * 64, "digest"),
        ("alpine@sha256:../../x", "digest"),
        ("alpine@md5:" + "a" * 32, "algorithm"),
        ("alpine@", "digest"),
        ("r.io/" + "a" * 256, "255"),
        ("r.io/", "no repository"),
    ]

    def test_good(self):
        for text, want in self.GOOD:
            with self.subTest(case=text):
                r = rp.parse_reference(text)
                self.assertEqual((r.registry, r.repository, r.tag, r.digest), want)

    def test_bad(self):
        for text, why in self.BAD:
            with self.subTest(case=text):
                with self.assertRaises(rp.InvalidReference) as cm:
                    rp.parse_reference(text)
                self.assertIn(why, str(cm.exception))
                self.assertEqual(cm.exception.exit_code, 2)

    def test_str_and_endpoint(self):
        r = rp.parse_reference("alpine")
        self.assertEqual(str(r), "docker.io/library/alpine:latest")
        self.assertEqual(r.endpoint, "registry-1.docker.io")
        self.assertEqual(rp.parse_reference("localhost:5000/a").endpoint, "localhost:5000")

    def test_digest_wins_over_tag(self):
        r = rp.parse_reference("r.io/a:t@sha256:" + "b" * 64)
        self.assertEqual(r.ref, "sha256:" + "b" * 64)


class PlatformTests(unittest.TestCase):
    def entries(self):
        out = []
        for arch, variant in (("amd64", ""), ("arm64", "v8"), ("arm", "v7"), ("arm", "v6")):
            out.append(rp.Descriptor(rp.MT_OCI_MANIFEST, sha256((arch + variant).encode()), 1,
                                     rp.Platform("linux", arch, variant)))
        out.insert(0, rp.Descriptor(rp.MT_OCI_MANIFEST, sha256(b"att"), 1, rp.Platform("unknown", "unknown"),
                                    {"vnd.docker.reference.type": "attestation-manifest"}))
        return out

    def test_selection(self):
        cases = [
            ("linux/amd64", "amd64"), ("linux/arm64", "arm64v8"), ("linux/arm64/v8", "arm64v8"),
            ("linux/arm", "armv7"), ("linux/arm/v7", "armv7"), ("linux/arm/v6", "armv6"),
            ("linux/amd64/v1", "amd64"), ("linux/amd64/v3", "amd64"),
        ]
        for want, digest_of in cases:
            with self.subTest(case=want):
                d = rp.select_platform(self.entries(), rp.parse_platform(want), "img")
                self.assertEqual(d.digest, sha256(digest_of.encode()))

    def test_no_match_lists_platforms(self):
        with self.assertRaises(rp.NoMatchingPlatform) as cm:
            rp.select_platform(self.entries(), rp.parse_platform("linux/s390x"), "img")
        msg = str(cm.exception)
        self.assertIn("linux/amd64", msg)
        self.assertIn("linux/arm/v7", msg)
        self.assertNotIn("unknown", msg)
        self.assertEqual(cm.exception.exit_code, 4)

    def test_attestation_never_chosen(self):
        only_att = self.entries()[:1]
        with self.assertRaises(rp.NoMatchingPlatform):
            rp.select_platform(only_att, rp.parse_platform("unknown/unknown"), "img")

    def test_host_platform(self):
        self.assertEqual(rp.host_platform(), rp._machine_platform(platform_mod.machine()))
        cases = {"x86_64": "linux/amd64", "AMD64": "linux/amd64", "aarch64": "linux/arm64", "arm64": "linux/arm64",
                 "armv7l": "linux/arm/v7", "armv8l": "linux/arm/v7", "armv6l": "linux/arm/v6", "i686": "linux/386",
                 "ppc64le": "linux/ppc64le", "s390x": "linux/s390x", "riscv64": "linux/riscv64"}
        for machine, want in cases.items():
            with self.subTest(case=machine):
                self.assertEqual(str(rp._machine_platform(machine)), want)

    def test_parse_platform_errors(self):
        for bad in ("linux/", "a/b/c/d", "linux//arm", "foo", ""):
            with self.subTest(case=bad):
                with self.assertRaises(rp.UsageError):
                    rp.parse_platform(bad)


# -- platforms and references as upstream reads them -----------------------------------------------
# Test tables for registry_pull's platform and reference parsing, transcribed (in our own
# words) from the upstream test files each row names.
#
# Written for this project from the behaviour of the upstream Go code (the facts
# carry over; no upstream code is copied).  Every row names its origin:
#
#   containerd/platforms  platforms.go (Parse), database.go (normalizeArch/OS),
#                         compare.go (Only/platformVector/Ordered), compare_test.go,
#                         platforms_test.go, platform_windows_compat.go,
#                         defaults_windows_test.go
#   distribution/reference  reference.go (Parse), normalize.go (ParseNormalizedNamed,
#                         splitDockerDomain), regexp.go, reference_test.go,
#                         normalize_test.go, regexp_test.go
#
# "derived" means the row is not an upstream test case but follows directly from
# reading the named upstream function; keep them, they pin down edge cases.
#
# Conventions
# -----------
# Platforms are (os, architecture, variant, os_version) with "" for absent fields.
#
# PLATFORM_PARSE expected values are what containerd's Parse() returns *literally*
# (so "linux/arm64" -> variant "" and "linux/arm64/v8" -> variant "v8").  Compare
# through canonical() (fills containerd's implicit default variants) rather than
# literally: registry_pull's Platform.normalized() fills arm64->v8, arm->v7,
# amd64->v1 in the same way.
#
# HOST_ARCH / HOST_VARIANT are placeholders for the host: containerd uses GOOS /
# GOARCH of the running binary (and, for 32-bit arm only, the CPU variant).  A
# bare architecture ("arm64") gets the host OS; for registry_pull, which only ever
# runs linux images, that is "linux".  Substitute with substitute_host().
#
# Reference rows are in registry_pull's terms: (registry, repository, tag, digest)
# as Reference(...) would hold them after Docker-style normalisation (docker.io,
# library/ prefix for single-component Hub names, tag "latest" only when there is
# neither tag nor digest; a tag given together with a digest is kept).  Upstream
# keeps the registry's case exactly as typed ("Foo", "Asdf.com"); registry_pull
# lowercases hosts, so compare the registry case-insensitively.


HOST_OS = "linux"          # registry_pull's host_platform() always says linux
HOST_ARCH = "{host_arch}"
HOST_VARIANT = "{host_variant}"

_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7", "amd64": "v1"}


def canonical(p):
    """containerd-equivalent form: fill the implicit default variant."""
    if p is None:
        return None
    os_, arch, variant, osver = p
    return (os_, arch, variant or _DEFAULT_VARIANT.get(arch, ""), osver)


def substitute_host(p, host_arch, host_variant=""):
    """Replace the HOST_* placeholders in an expected platform tuple."""
    if p is None:
        return None
    return tuple(host_arch if f == HOST_ARCH else host_variant if f == HOST_VARIANT else f for f in p)


# -- platform parsing ------------------------------------------------------------------------------
# (input, (os, arch, variant, os_version) | None)   None = Parse returns an error.
# Behaviour of containerd/platforms as of v1.0.0-rc (2025/26): dotted variants such as
# "v8.2" parse; "windows(...)" carries os.version (added by containerd/platforms PR #6,
# Feb 2024, first released in containerd/platforms v0.2.0 -- not in containerd 1.7's
# in-tree platforms package).
PLATFORM_PARSE = [
    # platforms_test.go TestParseSelector
    ("linux/arm64", ("linux", "arm64", "", "")),
    ("linux/arm64/v8", ("linux", "arm64", "v8", "")),
    ("linux/arm", ("linux", "arm", "", "")),            # v7 is implied and left out
    ("linux/arm/v6", ("linux", "arm", "v6", "")),
    ("linux/arm/v7", ("linux", "arm", "v7", "")),
    ("arm", (HOST_OS, "arm", "", "")),                 # bare arch -> host OS
    ("armel", (HOST_OS, "arm", "v6", "")),
    ("armhf", (HOST_OS, "arm", "", "")),
    ("Aarch64", (HOST_OS, "arm64", "", "")),            # case-insensitive alias
    ("x86_64", (HOST_OS, "amd64", "", "")),
    ("Linux/x86_64", ("linux", "amd64", "", "")),       # OS lower-cased too
    ("i386", (HOST_OS, "386", "", "")),
    ("linux", ("linux", HOST_ARCH, HOST_VARIANT, "")),  # bare OS -> host arch
    ("s390x", (HOST_OS, "s390x", "", "")),
    ("linux/s390x", ("linux", "s390x", "", "")),
    ("macOS", ("darwin", HOST_ARCH, HOST_VARIANT, "")),  # macos -> darwin
    ("windows", ("windows", HOST_ARCH, HOST_VARIANT, "")),
    ("windows()", ("windows", HOST_ARCH, HOST_VARIANT, "")),
    ("windows(10.0.17763)", ("windows", HOST_ARCH, HOST_VARIANT, "10.0.17763")),
    ("windows(10.0.17763)/amd64", ("windows", "amd64", "", "10.0.17763")),
    ("macos(Abcd.Efgh.123-4)/aarch64", ("darwin", "arm64", "", "Abcd.Efgh.123-4")),
    # compare_test.go (every candidate string there must parse)
    ("linux/amd64", ("linux", "amd64", "", "")),
    ("linux/386", ("linux", "386", "", "")),
    ("linux/amd64/v2", ("linux", "amd64", "v2", "")),
    ("linux/arm/v5", ("linux", "arm", "v5", "")),
    ("linux/arm/v4", ("linux", "arm", "v4", "")),
    ("linux/arm/v8", ("linux", "arm", "v8", "")),
    ("linux/arm64/v8.1", ("linux", "arm64", "v8.1", "")),
    ("linux/arm64/v9", ("linux", "arm64", "v9", "")),
    ("linux/arm64/v9.0", ("linux", "arm64", "v9", "")),  # v9.0 == v9
    ("windows/amd64", ("windows", "amd64", "", "")),
    # derived: database.go normalizeArch + Parse's 3-part arm64 rule
    ("linux/amd64/v1", ("linux", "amd64", "", "")),      # v1 is the default, dropped
    ("linux/x86-64", ("linux", "amd64", "", "")),
    ("linux/aarch64", ("linux", "arm64", "", "")),
    ("linux/aarch64/v8", ("linux", "arm64", "v8", "")),
    ("linux/arm64/8", ("linux", "arm64", "v8", "")),
    ("linux/arm64/v8.0", ("linux", "arm64", "v8", "")),
    ("linux/arm64/9", ("linux", "arm64", "v9", "")),
    ("linux/arm/7", ("linux", "arm", "v7", "")),
    ("linux/arm/6", ("linux", "arm", "v6", "")),
    ("linux/armhf", ("linux", "arm", "", "")),
    ("linux/armel", ("linux", "arm", "v6", "")),
    ("linux/i386", ("linux", "386", "", "")),
    ("LINUX/ARM64/V8", ("linux", "arm64", "v8", "")),
    ("arm64", (HOST_OS, "arm64", "", "")),
    ("amd64", (HOST_OS, "amd64", "", "")),
    ("linux/foo", ("linux", "foo", "", "")),             # 2 parts: arch not checked
    # platforms_test.go TestParseSelectorInvalid
    ("", None),
    ("/linux/arm", None),
    ("linux/arm/", None),
    ("linux /arm", None),
    ("linux/&arm", None),
    ("linux/arm/foo/bar", None),                       # max 3 components
    ("amd64/windows(10.0.17763)/foo", None),           # (...) only on the OS part
    ("linux)()---()..../arm/foo", None),
    ("../arm/foo", None),
    # derived: platforms.go Parse
    ("*", None),                                       # wildcards refused
    ("linux/*", None),
    ("foo", None),                                     # single unknown word
    ("linux//arm", None),
    ("windows/amd64:10.0.17763", None),                # go-containerregistry/crane/oras syntax,
                                                       # NOT containerd's (':' is not a specifier char)
]


# -- platform matching -----------------------------------------------------------------------------
# (wanted, candidate, matches) with containerd's Only(Parse(wanted)).Match(candidate)
# -- the matcher `docker pull --platform` uses (moby filterManifests).  Candidates
# are raw manifest platforms (os, architecture, variant, os.version).
PLATFORM_MATCH = [
    # compare_test.go TestOnly
    ("linux/amd64", ("linux", "amd64", "", ""), True),
    ("linux/amd64", ("linux", "386", "", ""), True),          # amd64 also runs 386
    ("linux/amd64", ("linux", "amd64", "v2", ""), False),     # no upward match
    ("linux/amd64", ("linux", "arm", "v7", ""), False),
    ("linux/amd64", ("linux", "arm64", "", ""), False),
    ("linux/amd64", ("windows", "amd64", "", ""), False),
    ("linux/amd64/v2", ("linux", "amd64", "", ""), True),
    ("linux/amd64/v2", ("linux", "amd64", "v1", ""), True),
    ("linux/amd64/v2", ("linux", "386", "", ""), True),
    ("linux/amd64/v2", ("linux", "amd64", "v3", ""), False),
    ("linux/386", ("linux", "386", "", ""), True),
    ("linux/386", ("linux", "amd64", "", ""), False),
    ("windows/amd64", ("windows", "amd64", "", ""), True),
    ("windows/amd64", ("windows", "amd64", "", "10.0.17763"), True),  # no version wanted: any
    ("windows/amd64", ("linux", "amd64", "", ""), False),
    ("linux/arm/v8", ("linux", "arm", "", ""), True),
    ("linux/arm/v8", ("linux", "arm", "v5", ""), True),
    ("linux/arm/v8", ("linux", "arm", "v4", ""), False),       # v5 is the floor
    ("linux/arm/v8", ("linux", "arm64", "", ""), False),
    ("linux/arm/v7", ("linux", "arm", "", ""), True),
    ("linux/arm/v7", ("linux", "arm", "v6", ""), True),
    ("linux/arm/v7", ("linux", "arm", "v5", ""), True),
    ("linux/arm/v7", ("linux", "arm", "v8", ""), False),
    ("linux/arm/v6", ("linux", "arm", "v5", ""), True),
    ("linux/arm/v6", ("linux", "arm", "", ""), False),         # "" means v7
    ("linux/arm/v5", ("linux", "arm", "v6", ""), False),
    ("linux/arm/v4", ("linux", "arm", "v4", ""), True),
    ("linux/arm/v4", ("linux", "arm", "v5", ""), False),
    ("linux/arm64", ("linux", "arm64", "", ""), True),
    ("linux/arm64", ("linux", "arm64", "v8", ""), True),
    ("linux/arm64", ("linux", "arm", "v8", ""), True),         # 64-bit host runs 32-bit arm
    ("linux/arm64", ("linux", "arm", "", ""), True),
    ("linux/arm64", ("linux", "arm", "v7", ""), True),
    ("linux/arm64", ("linux", "arm", "v6", ""), True),
    ("linux/arm64", ("linux", "arm", "v5", ""), True),
    ("linux/arm64", ("linux", "arm", "v4", ""), False),
    ("linux/arm64", ("linux", "arm", "v9", ""), False),
    ("linux/arm64", ("linux", "arm64", "v7", ""), False),
    ("linux/arm64", ("linux", "arm64", "v9", ""), False),
    ("linux/arm64", ("linux", "amd64", "", ""), False),
    ("linux/arm64", ("windows", "arm64", "", ""), False),
    ("linux/arm64/v8.1", ("linux", "arm64", "", ""), True),
    ("linux/arm64/v8.1", ("linux", "arm64", "v8.1", ""), True),
    ("linux/arm64/v8.1", ("linux", "arm", "v7", ""), True),
    ("linux/arm64/v8.1", ("linux", "arm64", "v9", ""), False),
    ("linux/arm64/v9", ("linux", "arm64", "v8.5", ""), True),   # v9.0 ~ v8.5
    ("linux/arm64/v9", ("linux", "arm64", "v8.1", ""), True),
    ("linux/arm64/v9", ("linux", "arm64", "v8", ""), True),
    ("linux/arm64/v9", ("linux", "arm64", "v9.0", ""), True),
    ("linux/arm64/v9", ("linux", "arm", "v5", ""), True),
    ("linux/arm64/v9", ("linux", "arm64", "v8.6", ""), False),
    ("linux/arm64/v9", ("linux", "arm64", "v10", ""), False),
    ("linux/arm64/v9", ("linux", "arm", "v4", ""), False),
    # derived: compare.go platformVector / database.go normalizeArch
    ("linux/amd64", ("linux", "amd64", "v1", ""), True),       # v1 == no variant
    ("linux/amd64", ("linux", "x86_64", "", ""), True),        # candidates are normalised too
    ("linux/arm64", ("linux", "aarch64", "", ""), True),
    ("linux/arm64", ("linux", "arm64", "v8.0", ""), True),
    ("linux/arm64", ("linux", "arm64", "v8.1", ""), False),    # plain arm64 host = exactly v8
    ("linux/arm/v7", ("linux", "armhf", "", ""), True),
    ("linux/arm/v7", ("linux", "armel", "", ""), True),        # armel == arm/v6
    ("linux/arm/v7", ("linux", "arm64", "", ""), False),
    ("linux/amd64/v3", ("linux", "amd64", "v2", ""), True),
    ("linux/amd64/v3", ("linux", "amd64", "v4", ""), False),
    ("linux/arm64/v8.2", ("linux", "arm64", "v8.3", ""), False),
    ("linux/arm64/v9.2", ("linux", "arm64", "v8.7", ""), True),  # v9.x ~ v8.(x+5)
    ("linux/arm64/v9.2", ("linux", "arm64", "v8.8", ""), False),
    ("linux/arm64/v9.2", ("linux", "arm64", "v9.1", ""), True),
    ("linux/arm64/v9", ("linux", "arm", "v9", ""), True),       # quirk: v9 (no minor) -> arm/v9..v5
    ("linux/arm64/v9.1", ("linux", "arm", "v9", ""), False),    # v9.x (with minor) -> arm/v8..v5
    # derived: platform_windows_compat.go (newest: the version check applies whenever
    # the wanted OS is windows, on any host) + defaults_windows_test.go ABI cases
    ("windows(10.0.17763)/amd64", ("windows", "amd64", "", ""), True),  # unversioned (HPC) always ok
    ("windows(10.0.17763)/amd64", ("windows", "amd64", "", "10.0.17763.1"), True),
    ("windows(10.0.17763)/amd64", ("windows", "amd64", "", "10.0.17764.1"), False),
    ("windows(10.0.17763)/amd64", ("windows", "amd64", "", "10.0.20348"), False),
    ("windows(10.0.20348)/amd64", ("windows", "amd64", "", "10.0.17763"), False),
    ("windows(10.0.20348)/amd64", ("windows", "amd64", "", "10.0.20348"), True),
    ("windows(10.0.22621)/amd64", ("windows", "amd64", "", "10.0.20348"), True),  # stable ABI >= ltsc2022
    ("windows(10.0.22621)/amd64", ("windows", "amd64", "", "10.0.17763"), False),
]

# OnlyStrict (compare_test.go TestOnlyStrict): no fall-backs at all, only normalisation.
PLATFORM_MATCH_STRICT = [
    ("linux/amd64", ("linux", "amd64", "", ""), True),
    ("linux/amd64", ("linux", "386", "", ""), False),
    ("linux/arm/v7", ("linux", "arm", "", ""), True),
    ("linux/arm/v7", ("linux", "arm", "v6", ""), False),
    ("linux/arm64", ("linux", "arm64", "v8", ""), True),
    ("linux/arm64", ("linux", "arm", "v7", ""), False),
    ("linux/arm64/v9", ("linux", "arm64", "v9.0", ""), True),
    ("linux/arm64/v9", ("linux", "arm64", "v8", ""), False),
    ("linux/arm64/v8.1", ("linux", "arm64", "v8", ""), False),
    ("windows(10.0.17763)/amd64", ("windows", "amd64", "", ""), True),
]


# -- ranking ---------------------------------------------------------------------------------------
# (wanted, [candidates in index order], expected_best | None)
# Derived from compare.go: Only() builds an ordered vector of acceptable platforms and
# Ordered.Less ranks a candidate by the first vector entry it matches; ties keep the
# index order (sort.SliceStable in moby's filterManifests).  None = nothing matches.
PLATFORM_ORDER = [
    ("linux/arm64", [("linux", "arm", "v7", ""), ("linux", "arm64", "", "")], ("linux", "arm64", "", "")),
    ("linux/arm64", [("linux", "arm", "v5", ""), ("linux", "arm", "v7", ""), ("linux", "arm", "v6", "")],
     ("linux", "arm", "v7", "")),
    ("linux/arm64", [("linux", "arm", "v7", ""), ("linux", "arm", "v8", "")], ("linux", "arm", "v8", "")),
    ("linux/arm64", [("linux", "arm", "v6", ""), ("linux", "arm", "", "")], ("linux", "arm", "", "")),
    ("linux/arm64", [("linux", "arm64", "v8.1", ""), ("linux", "arm", "v7", "")], ("linux", "arm", "v7", "")),
    ("linux/arm64", [("linux", "amd64", "", ""), ("linux", "386", "", "")], None),
    ("linux/arm64", [("linux", "arm64", "v8", ""), ("linux", "arm64", "", "")], ("linux", "arm64", "v8", "")),  # tie
    ("linux/amd64", [("linux", "386", "", ""), ("linux", "amd64", "", "")], ("linux", "amd64", "", "")),
    ("linux/amd64", [("linux", "arm64", "", ""), ("linux", "386", "", "")], ("linux", "386", "", "")),
    ("linux/amd64", [("linux", "amd64", "v2", ""), ("linux", "386", "", "")], ("linux", "386", "", "")),
    ("linux/amd64/v3", [("linux", "amd64", "", ""), ("linux", "amd64", "v4", ""), ("linux", "amd64", "v2", "")],
     ("linux", "amd64", "v2", "")),
    ("linux/amd64/v3", [("linux", "386", "", ""), ("linux", "amd64", "", "")], ("linux", "amd64", "", "")),
    ("linux/arm/v7", [("linux", "arm", "v5", ""), ("linux", "arm", "v6", "")], ("linux", "arm", "v6", "")),
    ("linux/arm/v7", [("linux", "arm", "v8", ""), ("linux", "arm", "v6", "")], ("linux", "arm", "v6", "")),
    ("linux/arm/v7", [("linux", "arm64", "", ""), ("linux", "arm", "v5", "")], ("linux", "arm", "v5", "")),
    ("linux/arm/v6", [("linux", "arm", "", ""), ("linux", "arm", "v7", "")], None),
    ("linux/arm64/v8.2", [("linux", "arm64", "", ""), ("linux", "arm64", "v8.3", ""), ("linux", "arm64", "v8.1", "")],
     ("linux", "arm64", "v8.1", "")),
    ("linux/arm64/v9", [("linux", "arm64", "", ""), ("linux", "arm64", "v8.5", "")], ("linux", "arm64", "v8.5", "")),
    ("linux/arm64/v9.1", [("linux", "arm64", "v8.6", ""), ("linux", "arm64", "v9", "")], ("linux", "arm64", "v9", "")),
    ("linux/arm64/v9.1", [("linux", "arm64", "v8.7", ""), ("linux", "arm64", "", "")], ("linux", "arm64", "", "")),
]


# -- references ------------------------------------------------------------------------------------
_F64 = "f" * 64
_HEX_BE = "be178c0543eb17f5f3043021c9e5fcf30285e557a4fc309cce97ff9ca6182912"
_HEX_DB = "dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c"
_HEX_86 = "86e0e091d0da6bde2456dbb48306f3956bbeb2eae1b5b9a43045843f69fe4aaa"
_HEX_1A = "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a"
_SONG = "thisisthesongthatneverendsitgoesonandonandonthisisthesongthatnev"  # 64 chars, not hex
H = "docker.io"
L = "latest"

# (input, (registry, repository, tag, digest))
REFERENCE_OK = [
    # normalize_test.go TestValidateReferenceName (valid)
    ("docker/docker", (H, "docker/docker", L, None)),
    ("library/debian", (H, "library/debian", L, None)),
    ("debian", (H, "library/debian", L, None)),
    ("docker.io/docker/docker", (H, "docker/docker", L, None)),
    ("docker.io/library/debian", (H, "library/debian", L, None)),
    ("docker.io/debian", (H, "library/debian", L, None)),
    ("index.docker.io/docker/docker", (H, "docker/docker", L, None)),
    ("index.docker.io/library/debian", (H, "library/debian", L, None)),
    ("index.docker.io/debian", (H, "library/debian", L, None)),
    ("127.0.0.1:5000/docker/docker", ("127.0.0.1:5000", "docker/docker", L, None)),
    ("127.0.0.1:5000/library/debian", ("127.0.0.1:5000", "library/debian", L, None)),
    ("127.0.0.1:5000/debian", ("127.0.0.1:5000", "debian", L, None)),       # no library/ off the Hub
    ("192.168.0.1", (H, "library/192.168.0.1", L, None)),                  # one component: never a host
    ("192.168.0.1:80", (H, "library/192.168.0.1", "80", None)),            # ...and ":80" is a tag
    ("192.168.0.1:8/debian", ("192.168.0.1:8", "debian", L, None)),
    ("192.168.0.2:25000/debian", ("192.168.0.2:25000", "debian", L, None)),
    (_SONG, (H, "library/" + _SONG, L, None)),
    ("[fc00::1]:5000/docker", ("[fc00::1]:5000", "docker", L, None)),
    ("[fc00::1]:5000/docker/docker", ("[fc00::1]:5000", "docker/docker", L, None)),
    ("[fc00:1:2:3:4:5:6:7]:5000/library/debian", ("[fc00:1:2:3:4:5:6:7]:5000", "library/debian", L, None)),
    ("docker.io/" + _HEX_1A, (H, "library/" + _HEX_1A, L, None)),         # 64-hex ok once a host is given
    ("Docker/docker", ("Docker", "docker", L, None)),                     # upper case first part = a host
    ("DOCKER/docker", ("DOCKER", "docker", L, None)),
    # normalize_test.go TestValidateRemoteName (valid)
    ("docker-rules/docker", (H, "docker-rules/docker", L, None)),
    ("docker---rules/docker", (H, "docker---rules/docker", L, None)),
    ("d/docker", (H, "d/docker", L, None)),
    ("jess/t", (H, "jess/t", L, None)),
    ("dock__er/docker", (H, "dock__er/docker", L, None)),
    # normalize_test.go TestParseRepositoryInfo
    ("index.docker.io/fooo/bar", (H, "fooo/bar", L, None)),
    ("other/library", (H, "other/library", L, None)),
    ("127.0.0.1:8000/private/moonbase", ("127.0.0.1:8000", "private/moonbase", L, None)),
    ("example.com:8000/privatebasee", ("example.com:8000", "privatebasee", L, None)),
    ("ubuntu-12.04-base", (H, "library/ubuntu-12.04-base", L, None)),
    ("library/foo/bar", (H, "library/foo/bar", L, None)),
    ("store/foo/bar", (H, "store/foo/bar", L, None)),
    ("Foo/bar", ("Foo", "bar", L, None)),
    ("FOO/bar", ("FOO", "bar", L, None)),
    # normalize_test.go TestParseReferenceWithTagAndDigest / TestParseAnyReference
    ("busybox:latest@sha256:" + _HEX_86, (H, "library/busybox", "latest", "sha256:" + _HEX_86)),
    ("redis@sha256:" + _HEX_DB, (H, "library/redis", None, "sha256:" + _HEX_DB)),
    ("dmcgowan/myapp:latest", (H, "dmcgowan/myapp", "latest", None)),
    (_HEX_DB[:63], (H, "library/" + _HEX_DB[:63], L, None)),              # 63 hex digits: a name
    ("dbcc1", (H, "library/dbcc1", L, None)),
    # normalize_test.go TestNormalizedSplitHostname
    ("test_com/foo", (H, "test_com/foo", L, None)),
    ("test-com:8080/foo", ("test-com:8080", "foo", L, None)),
    ("xn--n3h.com:18080/foo", ("xn--n3h.com:18080", "foo", L, None)),
    ("docker.io/library/foo/bar", (H, "library/foo/bar", L, None)),
    # normalize_test.go TestParseDockerRef
    ("gcr.io/library/busybox", ("gcr.io", "library/busybox", L, None)),
    # reference_test.go TestReferenceParse (normalised)
    ("test.com:5000", (H, "library/test.com", "5000", None)),
    ("test:5000/repo@sha256:" + _F64, ("test:5000", "repo", None, "sha256:" + _F64)),
    ("test:5000/repo:tag@sha256:" + _F64, ("test:5000", "repo", "tag", "sha256:" + _F64)),
    ("lowercase:Uppercase", (H, "library/lowercase", "Uppercase", None)),
    ("sub-dom1.foo.com/bar/baz/quux:some-long-tag", ("sub-dom1.foo.com", "bar/baz/quux", "some-long-tag", None)),
    ("b.gcr.io/test.example.com/my-app:test.example.com",
     ("b.gcr.io", "test.example.com/my-app", "test.example.com", None)),
    ("xn--7o8h.com/myimage:xn--7o8h.com@sha512:" + "f" * 128,
     ("xn--7o8h.com", "myimage", "xn--7o8h.com", "sha512:" + "f" * 128)),
    ("foo_bar.com:8080", (H, "library/foo_bar.com", "8080", None)),
    ("foo/foo_bar.com:8080", (H, "foo/foo_bar.com", "8080", None)),
    ("[2001:db8::1]/repo", ("[2001:db8::1]", "repo", L, None)),
    ("[2001:db8:1:2:3:4:5:6]/repo:tag", ("[2001:db8:1:2:3:4:5:6]", "repo", "tag", None)),
    ("[2001:db8::]:5000/repo", ("[2001:db8::]:5000", "repo", L, None)),
    ("[::1]:5000/repo", ("[::1]:5000", "repo", L, None)),
    ("[2001:db8::1]:5000/repo:tag@sha256:" + _F64, ("[2001:db8::1]:5000", "repo", "tag", "sha256:" + _F64)),
    # reference_test.go: the 255 limit is on the path only (distribution/reference PR #9, 2024)
    ("example.com/" + "a" * 255 + ":tag", ("example.com", "a" * 255, "tag", None)),
    ("a/" * 127 + "a:tag-puts-this-over-max", (H, "a/" * 127 + "a", "tag-puts-this-over-max", None)),
    # regexp_test.go
    ("Asdf.com/foo/bar", ("Asdf.com", "foo/bar", L, None)),               # upper-case host allowed
    ("localhost:8080/bar", ("localhost:8080", "bar", L, None)),
    ("localhost:8080@sha256:" + _HEX_BE, (H, "library/localhost", "8080", "sha256:" + _HEX_BE)),
    ("localhost@sha256:" + _HEX_BE, (H, "library/localhost", None, "sha256:" + _HEX_BE)),
    ("registry.io/foo/project--id.module--name.ver---sion--name",
     ("registry.io", "foo/project--id.module--name.ver---sion--name", L, None)),
    ("example.com/some_separator__underscore/myimage",
     ("example.com", "some_separator__underscore/myimage", L, None)),
    ("do__cker/docker", (H, "do__cker/docker", L, None)),
    # derived from normalize.go splitDockerDomain / reference.go Parse
    ("localhost/foo", ("localhost", "foo", L, None)),
    ("LOCALDOMAIN/debian", ("LOCALDOMAIN", "debian", L, None)),          # upper case => host
    ("Docker.io/foo", ("Docker.io", "foo", L, None)),                    # exact-case compare: not the Hub
    ("a" * 247, (H, "library/" + "a" * 247, L, None)),                   # path "library/"+247 = 255
    ("foo:" + "a" * 128, (H, "library/foo", "a" * 128, None)),           # tag max 128
    ("foo:_tag", (H, "library/foo", "_tag", None)),
    (_HEX_1A + ":latest", (H, "library/" + _HEX_1A, "latest", None)),    # only the *bare* 64-hex is refused
    ("foo@sha384:" + "f" * 96, (H, "library/foo", None, "sha384:" + "f" * 96)),  # go-digest knows sha384
    ("192.168.1.1:75050/repo", ("192.168.1.1:75050", "repo", L, None)),  # port = [0-9]+, never range-checked
    ("[fd00123123123]:5000/repo", ("[fd00123123123]:5000", "repo", L, None)),  # [hex/colon] is not validated
]

# (input, why)
REFERENCE_BAD = [
    # normalize_test.go TestValidateReferenceName (invalid)
    ("https://github.com/docker/docker", "scheme: 'https:' is no host"),
    ("docker/Docker", "upper case in the repository path"),
    ("-docker", "component starts with '-'"),
    ("-docker/docker", "component starts with '-'"),
    ("-docker.io/docker/docker", "host label starts with '-'"),
    ("docker///docker", "empty path components"),
    ("docker.io/docker/Docker", "upper case in the repository path"),
    ("docker.io/docker///docker", "empty path components"),
    ("[fc00::1]", "one component: not a host, and '[' is no name character"),
    ("[fc00::1]:5000", "host without a repository"),
    ("fc00::1:5000/debian", "IPv6 without brackets"),
    ("[fe80::1%eth0]:5000/debian", "IPv6 zone identifier"),
    ("[2001:db8:3:4::192.0.2.33]:5000/debian", "IPv6 with embedded IPv4 is outside the grammar"),
    (_HEX_1A, "bare 64-hex string (looks like an image ID)"),
    # normalize_test.go TestValidateRemoteName (invalid)
    ("docker-/docker", "component ends with '-'"),
    ("-docker-/docker", "component starts with '-'"),
    ("____/____", "underscore-only components"),
    ("_docker/_docker", "component starts with '_'"),
    ("dock..er/docker", "two periods"),
    ("dock_.er/docker", "mixed separators"),
    ("dock-.er/docker", "mixed separators"),
    ("docker/", "empty last component"),
    ("_".join(["this_is_not_a_valid_namespace_because_its_lenth_is_greater_than_255"] * 4) + "/docker",
     "path longer than 255"),
    # reference_test.go TestReferenceParse errors
    ("", "empty"),
    (":justtag", "no name"),
    ("@sha256:" + _F64, "no name"),
    ("repo@sha256:" + "f" * 34, "digest too short for sha256"),
    ("validname@invaliddigest:" + _F64, "unsupported digest algorithm"),
    ("Uppercase:tag", "upper case in a one-component name"),
    ("test:5000/Uppercase/lowercase:tag", "upper case in the repository path"),
    ("domain/" + "a" * 256 + ":tag", "path longer than 255"),
    ("aa/asdf$$^/aa", "illegal characters"),
    ("[2001:db8::1]:tag", "one component with brackets"),
    ("[fe80::1%@invalidzone]:5000/repo", "IPv6 zone identifier"),
    # regexp_test.go
    ("registry.com:8080/myapp@sha256:badbadbadbad", "digest too short"),
    ("registry.com:8080/myapp:invalid~tag", "'~' in tag"),
    ("bad_hostname.com:8080/myapp:tag", "'_' in a host"),
    ("localhost:http/name@sha256:" + _HEX_BE, "non-numeric port"),
    ("registry.com:8080/myapp@bad", "digest without algorithm"),
    ("registry.com:8080/myapp@2bad", "digest algorithm must start with a letter"),
    ("foo.com:http/bar", "non-numeric port"),
    ("example.com/__underscore/myimage", "component starts with '_'"),
    ("example.com/.dots/myimage", "component starts with '.'"),
    ("docker./docker", "host ends with '.'"),
    ("Foo/FarB", "upper case in the repository path (Foo is taken as host)"),
    ("a//a/a", "empty path component"),
    # derived from reference.go / normalize.go / go-digest
    ("a" * 248, "Hub path 'library/'+248 chars is longer than 255"),
    ("example.com/" + "a" * 256, "path longer than 255"),
    ("foo:", "empty tag"),
    ("foo:-tag", "tag must start with [A-Za-z0-9_]"),
    ("foo:" + "a" * 129, "tag longer than 128"),
    ("foo@sha256:" + _HEX_DB.upper(), "digest hex must be lower case"),
    ("7EC43B381E5AEFE6E04EFB0B3F0693FF2A4A50652D64AEC573905F2DB5889A1C", "upper case (and not an ID either)"),
    (" foo", "white space"),
    ("foo@sha256:" + _F64 + "@sha256:" + _F64, "two digests"),
]


# Deliberate differences from upstream, each for a reason:
# - "windows/amd64:10.0.17763" (the syntax of crane and oras) is accepted too;
# - a sha384 digest, a port above 65535 and a bracketed host that is no IPv6 address are refused at
#   once rather than at connection time.
PLATFORM_PARSE_OURS = {"windows/amd64:10.0.17763": ("windows", "amd64", "", "10.0.17763")}
REFERENCE_STRICTER = ("sha384:", ":75050/", "[fd00123123123]")


def index_of(platforms):
    return [rp.Descriptor(rp.MANIFEST_TYPES[0], "sha256:%064x" % (i + 1), 100,
                          rp.Platform(p[0], p[1], p[2], p[3]) if p is not None else None, None)
            for i, p in enumerate(platforms)]


class UpstreamTableTests(unittest.TestCase):
    def test_platform_parse(self):
        host = rp.host_platform()
        for text, expected in PLATFORM_PARSE:
            expected = PLATFORM_PARSE_OURS.get(text, expected)
            with self.subTest(case=text):
                expected = canonical(substitute_host(expected, host.architecture, host.variant))
                try:
                    p = rp.parse_platform(text).normalized()
                    got = (p.os, p.architecture, p.variant, p.os_version)
                except rp.UsageError:
                    got = None
                self.assertEqual(got, expected)

    def test_platform_match(self):
        for wanted, candidate, matches in PLATFORM_MATCH:
            with self.subTest(case=(wanted, candidate)):
                try:
                    chosen = rp.select_platform(index_of([candidate]), rp.parse_platform(wanted), "img")
                except rp.NoMatchingPlatform:
                    chosen = None
                self.assertEqual(chosen is not None, matches)

    def test_platform_order(self):
        for wanted, candidates, best in PLATFORM_ORDER:
            with self.subTest(case=(wanted, candidates)):
                index = index_of(candidates)
                try:
                    chosen = candidates[index.index(rp.select_platform(index, rp.parse_platform(wanted), "img"))]
                except rp.NoMatchingPlatform:
                    chosen = None
                self.assertEqual(chosen, best)

    def test_entry_without_platform_is_the_last_resort(self):
        index = index_of([("linux", "s390x", "", ""), None, ("linux", "amd64", "", "")])
        self.assertEqual(rp.select_platform(index, rp.parse_platform("linux/amd64"), "img"), index[2])
        self.assertEqual(rp.select_platform(index, rp.parse_platform("linux/arm64"), "img"), index[1])

    def test_references(self):
        for text, (registry, repository, tag, digest) in REFERENCE_OK:
            if any(s in text for s in REFERENCE_STRICTER):
                continue
            with self.subTest(case=text):
                r = rp.parse_reference(text)
                self.assertEqual((r.registry, r.repository, r.tag, r.digest), (registry, repository, tag, digest))
        for text, why in REFERENCE_BAD:
            with self.subTest(case=text, why=why):
                with self.assertRaises(rp.InvalidReference):
                    rp.parse_reference(text)
        for text in [t for t, _ in REFERENCE_OK if any(s in t for s in REFERENCE_STRICTER)]:
            with self.subTest(case=text, stricter=True):
                with self.assertRaises(rp.PullError):
                    rp.parse_reference(text)


class PlatformPullTests(Base):
    def test_arm64_host_takes_arm_v7_when_that_is_all(self):
        reg = self.registry()
        reg.push_index("only/arm", "v1", [Image("arm", "v7"), Image("s390x")])
        code, out, err = self.main("--home", self.home, "--json", "-v", "--platform", "linux/aarch64",
                                   reg.host + "/only/arm:v1")
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["platform"], "linux/arm/v7")
        self.assertIn("compatible", doc["platform_match"])
        self.assertIn("compatible", err)  # -v says which entry was chosen and why

    def test_single_image_for_another_platform_is_refused_unless_pinned(self):
        reg = self.registry()
        img = reg.push("single/arm", "v1", Image("arm64", "v8"))
        code, out, err = self.main(*self.cli_args(reg.host + "/single/arm:v1"))
        self.assertEqual(code, 4, err)
        self.assertIn("by digest", err)
        self.assertEqual(self.image_rows(), [])
        code, out, err = self.main(*self.cli_args(reg.host + "/single/arm@" + img.digest))
        self.assertEqual(code, 0, err)
        self.assertIn("is an image for linux/arm64/v8, not linux/amd64", err)

    def test_windows_os_version_chooses_among_windows_entries(self):
        reg = self.registry()
        old, new = Image("amd64"), Image("amd64")
        for img, version in ((old, "10.0.17763.5000"), (new, "10.0.20348.2000")):
            img.edit(config=lambda cfg, v=version: cfg.update({"os": "windows", "os.version": v}))
        reg.push_index("win/app", "v1", [old, new], attestations=False)
        doc = json.loads(reg.manifests[("win/app", "v1")][1])
        doc["manifests"][0]["platform"].update({"os": "windows", "os.version": "10.0.17763.5000"})
        doc["manifests"][1]["platform"].update({"os": "windows", "os.version": "10.0.20348.2000"})
        data = json.dumps(doc).encode()
        reg.manifests[("win/app", "v2")] = (rp.MT_OCI_INDEX, data)
        reg.manifests[("win/app", sha256(data))] = (rp.MT_OCI_INDEX, data)
        res = self.pull(reg, "win/app:v2", platform="windows(10.0.20348)/amd64")
        self.assertEqual(res.manifest_digest, new.digest)
        self.assertEqual(res.platform.os_version, "10.0.20348.2000")
        res = self.pull(reg, "win/app:v2", platform="windows/amd64:10.0.17763")
        self.assertEqual(res.manifest_digest, old.digest)
        self.assertEqual(res.to_json()["platform_details"]["os.version"], "10.0.17763.5000")


class StrictParsingTests(Base):
    """A trailing newline is not part of a digest, a platform or a layout name."""

    def test_trailing_newline_refused(self):
        with self.assertRaises(rp.IntegrityError):
            rp.check_digest("sha256:" + "a" * 64 + "\n")
        with self.assertRaises(rp.UsageError):
            rp.parse_platform("linux/amd64\n")
        reg = self.registry()
        reg.push("nl/app", "v1", Image())
        layout = os.path.join(self.home, "layout")
        for argv in (("--oci-layout", layout + ":name\n"), ("--platform", "linux/amd64\n")):
            with self.subTest(case=argv):
                code, out, err = self.main("--home", self.home, *argv, reg.host + "/nl/app:v1")
                self.assertEqual(code, 2, err)
                self.assertOneErrorLine(err)
        self.assertEqual(reg.requests(kind="blobs"), [])
        self.assertFalse(os.path.exists(layout))


# --------------------------------------------------------------------------- auth and credentials


class ChallengeTests(unittest.TestCase):
    def test_parse(self):
        cases = [
            ('Bearer realm="https://auth.example/token",service="reg.example",scope="repository:a/b:pull"',
             [("bearer", {"realm": "https://auth.example/token", "service": "reg.example",
                          "scope": "repository:a/b:pull"})]),
            ('Basic realm="Registry Realm"', [("basic", {"realm": "Registry Realm"})]),
            ('Bearer realm="r",scope="repository:a:pull,push"',
             [("bearer", {"realm": "r", "scope": "repository:a:pull,push"})]),
            ('Bearer realm="r", error="invalid_token"', [("bearer", {"realm": "r", "error": "invalid_token"})]),
            ('Basic realm="x", Bearer realm="y",service="s"',
             [("basic", {"realm": "x"}), ("bearer", {"realm": "y", "service": "s"})]),
            ('Bearer realm=unquoted,service=svc', [("bearer", {"realm": "unquoted", "service": "svc"})]),
            ('Bearer realm="a\\"b"', [("bearer", {"realm": 'a"b'})]),
            ("", []),
        ]
        for header, want in cases:
            with self.subTest(case=header):
                self.assertEqual(rp.parse_www_authenticate(header), want)


class AuthTests(Base):
    def test_bearer_anonymous(self):
        reg = self.registry(auth="bearer")
        img = reg.push("b/app", "v1", Image())
        self.pull(reg, "b/app:v1")
        self.assertStoreHas(img)
        # One token for all requests of the pull, scoped to the repository, from the challenge's realm.
        self.assertEqual(len(reg.token_requests), 1)
        method, q, auth = reg.token_requests[0]
        self.assertEqual(q["scope"], ["repository:b/app:pull"])
        self.assertEqual(q["service"], ["test-registry"])
        self.assertEqual(auth, "")

    def test_bearer_with_credentials(self):
        reg = self.registry(auth="bearer")
        reg.anonymous_tokens = False
        img = reg.push("b/priv", "v1", Image())
        self.pull(reg, "b/priv:v1", username="alice", password="s3cret")
        self.assertStoreHas(img)
        with self.assertRaises(rp.AuthError) as cm:
            self.pull(reg, "b/priv:v1", username="alice", password="wrong")
        self.assertNotIn("wrong", str(cm.exception))
        self.assertEqual(cm.exception.exit_code, 3)

    def test_basic(self):
        reg = self.registry(auth="basic")
        img = reg.push("basic/app", "v1", Image())
        self.pull(reg, "basic/app:v1", username="alice", password="s3cret")
        self.assertStoreHas(img)
        for bad in ({"username": "alice", "password": "nope"}, {}):
            with self.subTest(case=bad):
                with self.assertRaises(rp.AuthError) as cm:
                    self.pull(reg, "basic/app:v1", **bad)
                self.assertNotIn("nope", str(cm.exception))

    def test_token_renewed_before_it_expires(self):
        reg = self.registry(auth="bearer", token_lifetime=2)
        img = reg.push("slow/app", "v1", Image(layers=[make_layer({"f%d" % i: os.urandom(50000)}) for i in range(4)]))
        # A slow consumer (0.7 s per blob, one at a time) makes the pull outlive its 2-second tokens;
        # renewal comes 0.4 s (a fifth of the lifetime) before expiry, ample slack on a loaded machine.
        self.pull(reg, "slow/app:v1", jobs=1, progress=lambda d, done, total: done == total and time.sleep(0.7))
        self.assertStoreHas(img)
        self.assertGreaterEqual(len(reg.token_requests), 2)
        self.assertEqual(reg.refused_tokens, [])  # renewed ahead of time: no request met an expired token

    def test_token_expiring_in_flight_is_renewed_on_401(self):
        reg = self.registry(auth="bearer", token_lifetime=1)
        img = reg.push("slow2/app", "v1", Image(layers=[make_layer({"f%d" % i: os.urandom(50000)})
                                                        for i in range(4)]))

        held = []

        def slow(h, method, path):
            # The first blob request is held until the token it carries has died, then checked:
            # a token that was good when sent and is expired when it arrives (however loaded the
            # machine, unlike a fixed sleep the client's early renewal could outrun).
            auth = h.headers.get("Authorization", "")
            expiry = reg.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
            if "/blobs/" in path and expiry and not held:
                held.append(path)
                time.sleep(max(0.0, expiry - time.time()) + 0.05)
            return False
        reg.fault = slow
        self.pull(reg, "slow2/app:v1", jobs=1)
        self.assertStoreHas(img)
        self.assertTrue(reg.refused_tokens)
        self.assertGreaterEqual(len(reg.token_requests), 2)

    def test_invalid_token_retried_once(self):
        reg = self.registry(auth="bearer")
        img = reg.push("inv/app", "v1", Image())
        hit = []

        def revoke(h, method, path):
            if "/blobs/" in path and not hit:
                hit.append(path)
                reg.tokens.clear()  # the registry forgets every token: one 401 invalid_token
            return False
        reg.fault = revoke
        self.pull(reg, "inv/app:v1")
        self.assertStoreHas(img)
        self.assertEqual(len(reg.token_requests), 2)

    def test_access_token_only_and_no_expiry(self):
        reg = self.registry(auth="bearer")
        reg.token_answer = "access_token"
        reg.send_expires_in = False
        img = reg.push("at/app", "v1", Image())
        self.pull(reg, "at/app:v1")
        self.assertStoreHas(img)
        self.assertEqual(len(reg.token_requests), 1)  # without expires_in the token still serves the pull

    def test_redirect_drops_authorization(self):
        reg = self.registry(auth="bearer")
        objects = ObjectStore(reg).start(self)
        reg.redirect_to = objects.url
        img = reg.push("redir/app", "v1", Image())
        self.pull(reg, "redir/app:v1")
        self.assertStoreHas(img)
        self.assertEqual(len(objects.log), 3)  # config + two layers, all from the object store
        for path, headers in objects.log:
            self.assertNotIn("Authorization", headers)


class CredentialTests(Base):
    def write_json(self, path, doc):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(doc, f)
        return path

    def basic_registry(self):
        reg = self.registry(auth="basic")
        return reg, reg.push("cred/app", "v1", Image())

    def test_each_file_source(self):
        auth = base64.b64encode(b"alice:s3cret").decode()
        cases = {
            "REGISTRY_AUTH_FILE": lambda host: ("REGISTRY_AUTH_FILE", self.write_json(
                os.path.join(self.home, "podman-auth.json"), {"auths": {host: {"auth": auth}}})),
            "XDG_RUNTIME_DIR": lambda host: ("XDG_RUNTIME_DIR", os.path.dirname(os.path.dirname(self.write_json(
                os.path.join(self.home, "run", "containers", "auth.json"), {"auths": {host: {"auth": auth}}})))),
            "docker-auth": lambda host: ("DOCKER_CONFIG", os.path.dirname(self.write_json(
                os.path.join(self.home, "docker1", "config.json"), {"auths": {host: {"auth": auth}}}))),
            "docker-https-key": lambda host: ("DOCKER_CONFIG", os.path.dirname(self.write_json(
                os.path.join(self.home, "docker2", "config.json"), {"auths": {"https://" + host: {"auth": auth}}}))),
            "docker-user-pass": lambda host: ("DOCKER_CONFIG", os.path.dirname(self.write_json(
                os.path.join(self.home, "docker3", "config.json"),
                {"auths": {host: {"username": "alice", "password": "s3cret"}}}))),
        }
        for name, make in cases.items():
            with self.subTest(case=name):
                reg, img = self.basic_registry()
                var, value = make(reg.host)
                old = os.environ.get(var)
                os.environ[var] = value
                try:
                    code, out, err = self.main("--home", self.home, "-vv", "--platform", "linux/amd64",
                                               reg.host + "/cred/app:v1")
                finally:
                    self._restore_env(var, old)
                self.assertEqual(code, 0, err)
                self.assertNotIn("s3cret", err)
                self.assertNotIn(auth, err)
                self.assertStoreHas(img)
        with open(os.path.join(self.home, "oci.db"), "rb") as f:
            db = f.read()
        self.assertNotIn(b"s3cret", db)
        self.assertNotIn(auth.encode(), db)

    def test_first_match_wins(self):
        reg, img = self.basic_registry()
        good = base64.b64encode(b"alice:s3cret").decode()
        bad = base64.b64encode(b"alice:wrong").decode()
        os.environ["REGISTRY_AUTH_FILE"] = self.write_json(os.path.join(self.home, "a.json"),
                                                           {"auths": {reg.host: {"auth": good}}})
        os.environ["DOCKER_CONFIG"] = os.path.dirname(self.write_json(
            os.path.join(self.home, "d", "config.json"), {"auths": {reg.host: {"auth": bad}}}))
        self.pull(reg, "cred/app:v1")
        self.assertStoreHas(img)
        creds = rp.find_credentials(reg.host)
        self.assertEqual(creds.source, os.environ["REGISTRY_AUTH_FILE"])
        self.assertNotIn("s3cret", repr(creds))

    def test_docker_hub_keys(self):
        auth = base64.b64encode(b"hubuser:hubpass").decode()
        for key in ("https://index.docker.io/v1/", "index.docker.io", "docker.io", "https://index.docker.io/v1"):
            with self.subTest(case=key):
                path = self.write_json(os.path.join(self.home, "hub", key.replace("/", "_"), "config.json"),
                                       {"auths": {key: {"auth": auth}}})
                creds = rp.find_credentials("docker.io", env={"DOCKER_CONFIG": os.path.dirname(path),
                                                              "HOME": self.home})
                self.assertEqual((creds.username, creds.password), ("hubuser", "hubpass"))
                self.assertIsNone(rp.find_credentials("ghcr.io", env={"DOCKER_CONFIG": os.path.dirname(path),
                                                                      "HOME": self.home}))

    def helper(self, name, body):
        bindir = os.path.join(self.home, "bin")
        os.makedirs(bindir, exist_ok=True)
        path = os.path.join(bindir, "docker-credential-" + name)
        with open(path, "w") as f:
            f.write("#!/bin/sh\n" + body)
        os.chmod(path, 0o755)
        old = os.environ["PATH"]
        os.environ["PATH"] = bindir + os.pathsep + old
        self.addCleanup(os.environ.__setitem__, "PATH", old)

    def test_cred_helpers_and_store(self):
        for key in ("credHelpers", "credsStore"):
            with self.subTest(case=key):
                reg, img = self.basic_registry()
                seen = os.path.join(self.home, "helper-%s.stdin" % key)
                self.helper("fake" + key.lower(), '[ "$1" = get ] || exit 1\ncat > %s\n'
                            'echo \'{"ServerURL":"x","Username":"alice","Secret":"s3cret"}\'\n' % seen)
                conf = {"credHelpers": {reg.host: "fake" + key.lower()}} if key == "credHelpers" else \
                    {"credsStore": "fake" + key.lower()}
                os.environ["DOCKER_CONFIG"] = os.path.dirname(self.write_json(
                    os.path.join(self.home, key, "config.json"), conf))
                code, out, err = self.main("--home", self.home, "-vv", "--platform", "linux/amd64",
                                           reg.host + "/cred/app:v1")
                self.assertEqual(code, 0, err)
                self.assertNotIn("s3cret", err)
                with open(seen) as f:
                    self.assertEqual(f.read(), reg.host)  # the server on stdin
                self.assertStoreHas(img)

    def test_missing_helper_named(self):
        reg, img = self.basic_registry()
        os.environ["DOCKER_CONFIG"] = os.path.dirname(self.write_json(
            os.path.join(self.home, "missing", "config.json"), {"credsStore": "nosuchthing"}))
        code, out, err = self.main("--home", self.home, reg.host + "/cred/app:v1")
        self.assertEqual(code, 3, err)
        self.assertIn("docker-credential-nosuchthing", err)

    def test_identity_token_oauth2_grant(self):
        reg = self.registry(auth="bearer")
        reg.anonymous_tokens = False
        img = reg.push("idt/app", "v1", Image())
        os.environ["DOCKER_CONFIG"] = os.path.dirname(self.write_json(
            os.path.join(self.home, "idt", "config.json"),
            {"auths": {reg.host: {"auth": base64.b64encode(b"alice:").decode(), "identitytoken": "refresh-me"}}}))
        self.pull(reg, "idt/app:v1")
        self.assertStoreHas(img)
        method, form, auth = reg.token_requests[0]
        self.assertEqual(method, "POST")
        self.assertEqual(form["grant_type"], ["refresh_token"])
        self.assertEqual(form["scope"], ["repository:idt/app:pull"])
        self.assertEqual(auth, "")  # the refresh token goes in the form, not in a Basic header

    def test_missing_creds_store_helper_is_a_warning_for_an_anonymous_pull(self):
        """config.json naming credsStore "desktop" (not on PATH): a warning, and the anonymous pull succeeds."""
        if shutil.which("docker-credential-desktop"):
            self.skipTest("docker-credential-desktop is on PATH here")
        reg = self.registry()
        img = reg.push("anon/app", "v1", Image())
        os.makedirs(os.environ["DOCKER_CONFIG"], exist_ok=True)
        with open(os.path.join(os.environ["DOCKER_CONFIG"], "config.json"), "w") as f:
            json.dump({"auths": {}, "credsStore": "desktop"}, f)
        code, out, err = self.main(*self.cli_args(reg.host + "/anon/app:v1"))
        self.assertTrue(reg.log, "no request reached the registry")
        self.assertEqual(code, 0, err)
        self.assertIn("docker-credential-desktop", err)  # the warning
        self.assertStoreHas(img)


class QuirkTests(Base):
    def test_missing_expires_in_means_60s(self):
        reg = self.registry(auth="bearer")
        reg.send_expires_in = False
        img = reg.push("q/noexp", "v1", Image(layers=[make_layer({"f%d" % i: b"x"}) for i in range(5)]))
        self.pull(reg, "q/noexp:v1", jobs=1)
        self.assertStoreHas(img)
        self.assertEqual(len(reg.token_requests), 1)  # cached, not fetched per request
        client = rp._Client(reg.host)
        token, lifetime = client.auth.fetch_token({"realm": "http://%s/token" % reg.host}, "repository:q/noexp:pull")
        self.assertEqual(lifetime, 60.0)

    def test_several_challenges_in_one_header(self):
        reg = self.registry(auth="bearer")
        reg.challenge_prefix = 'Basic realm="Registry, with a comma", '
        img = reg.push("q/multi", "v1", Image())
        self.pull(reg, "q/multi:v1")
        self.assertStoreHas(img)
        self.assertEqual(len(reg.token_requests), 1)

    def test_blob_redirected_twice(self):
        reg = self.registry(auth="bearer")
        objects = ObjectStore(reg).start(self)
        reg.redirect_to, reg.redirect_hops = objects.url, 2
        img = reg.push("q/hops", "v1", Image())
        self.pull(reg, "q/hops:v1")
        self.assertStoreHas(img)
        self.assertEqual(len(objects.log), 6)  # two hops for each of three blobs
        self.assertFalse([h for _, h in objects.log if "Authorization" in h])

    def test_401_on_v2_but_anonymous_repository(self):
        reg = self.registry()
        reg.v2_wants_auth = True
        img = reg.push("q/anon", "v1", Image())
        self.pull(reg, "q/anon:v1")
        self.assertStoreHas(img)

    def test_every_www_authenticate_header_is_read(self):
        """A 401 with a Basic and a Bearer WWW-Authenticate header: the Bearer one is used, anonymous pull works."""
        reg = self.registry(auth="bearer")
        img = reg.push("two/app", "v1", Image())

        def fault(h, method, path):
            if path == "/token":
                return False
            auth = h.headers.get("Authorization", "")
            tok = auth[7:] if auth.startswith("Bearer ") else None
            if tok in reg.tokens and time.time() < reg.tokens[tok]:
                return False
            m = re.match(r"^/v2/(.+)/(?:manifests|blobs)/", path)
            scope = ',scope="repository:%s:pull"' % m.group(1) if m else ""
            body = b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'
            h.send_response(401)
            h.send_header("WWW-Authenticate", 'Basic realm="%s"' % reg.host)
            h.send_header("WWW-Authenticate",
                          'Bearer realm="http://%s/token",service="test-registry"%s' % (reg.host, scope))
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(body)))
            h.end_headers()
            if method != "HEAD":
                h.wfile.write(body)
            return True
        reg.fault = fault
        code, out, err = self.main(*self.cli_args(reg.host + "/two/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)


HOSTILE_CODE = "\x1b]52;c;cm0gLXJmIH4K\x07"  # OSC 52: writes the clipboard
HOSTILE_MESSAGE = "\x1b[2Jscreen cleared"


class TrustBoundaryTests(Base):
    """Credentials, token realms, mirrors and the servers' own words stay within bounds."""

    def test_401_from_a_redirect_target_never_starts_authentication(self):
        reg = self.registry(auth="basic")
        img = reg.push("basic/app", "v1", Image())
        seen = []

        class Attacker(QuietHandler):
            def answer(self):
                n = int(self.headers.get("Content-Length") or 0)
                if n:
                    self.rfile.read(n)
                seen.append((self.command, self.path, dict(self.headers)))
                if self.path.startswith("/steal"):
                    status, body, headers = 200, json.dumps({"token": "stolen", "expires_in": 300}).encode(), {}
                else:
                    status, body = 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"log in"}]}'
                    headers = {"WWW-Authenticate": 'Bearer realm="http://%s/steal",service=x' % attacker}
                self.send_response(status)
                headers.update({"Content-Type": "application/json", "Content-Length": str(len(body))})
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_HEAD = do_POST = answer

        _, attacker = serve(self, Attacker)
        reg.redirect_to = "http://" + attacker
        auth = base64.b64encode(b"alice:s3cret").decode()
        path = os.path.join(self.home, "auth.json")
        with open(path, "w") as f:
            json.dump({"auths": {reg.host: {"auth": auth}}}, f)
        os.environ["REGISTRY_AUTH_FILE"] = path
        code, out, err = self.main(*self.cli_args(reg.host + "/basic/app:v1"))
        self.assertTrue(seen, "the blob was redirected to the second server")
        self.assertEqual([p for _, p, _ in seen if p.startswith("/steal")], [], "a request reached its realm")
        self.assertEqual([p for _, p, h in seen if "Authorization" in h], [], "credentials reached it")
        self.assertEqual(code, 3, err)
        self.assertOneErrorLine(err)
        self.assertIn(attacker, err)  # names the redirect host, not only the registry
        self.assertNotIn(sha256(img.layers[0])[7:], os.listdir(os.path.join(self.home, "blobs", "sha256")))

    def test_public_registry_naming_a_private_token_realm_is_refused(self):
        reg = self.registry()
        reg.push("realm/app", "v1", Image())
        tokens = self.registry()  # only its /token would be used: a service on a private address

        def challenge(h, method, path):
            if path.startswith("/v2/") and "Authorization" not in h.headers:
                h.error(401, "UNAUTHORIZED", method == "HEAD", {
                    "WWW-Authenticate": 'Bearer realm="http://%s/token",service="x"' % tokens.host})
                return True
            return False
        reg.fault = challenge
        real = rp._Targets.is_public
        rp._Targets.is_public = lambda targets: True  # as if the registry resolved to a public address
        self.addCleanup(setattr, rp._Targets, "is_public", real)
        code, out, err = self.main(*self.cli_args(reg.host + "/realm/app:v1"))
        self.assertEqual(code, 3, err)
        self.assertOneErrorLine(err)
        self.assertIn("realm", err)
        self.assertIn("refused", err)
        self.assertEqual(tokens.log, [])  # refused before any request to it
        self.assertEqual(tokens.token_requests, [])

    def test_https_registry_naming_a_plain_http_realm_is_refused_unless_insecure(self):
        self.no_network_names()  # registry.example.com is a name only: never looked up
        tokens = self.registry()
        params = {"realm": "http://%s/token" % tokens.host, "service": "test-registry"}
        client = rp._Client("registry.example.com")
        client.scheme, client.targets.public = "https", False  # an HTTPS registry; the SSRF rule is not what is tested
        with self.assertRaises(rp.AuthError) as cm:  # even on loopback, as a redirect from HTTPS to HTTP is
            client.auth.fetch_token(params, "repository:a/b:pull")
        self.assertIn("realm", str(cm.exception))
        self.assertIn("refused", str(cm.exception))
        self.assertEqual(tokens.log, [])
        client = rp._Client("registry.example.com", insecure=True)
        client.scheme, client.targets.public = "https", False
        token, lifetime = client.auth.fetch_token(params, "repository:a/b:pull")
        self.assertTrue(token)
        self.assertEqual(len(tokens.token_requests), 1)

    def test_plain_http_mirror_needs_insecure_unless_loopback(self):
        asked = self.no_network_names()
        reg = self.registry()
        img = reg.push("mir/app", "v1", Image())
        code, out, err = self.main(*self.cli_args("--mirror", "http://example.invalid:5000", reg.host + "/mir/app:v1"))
        self.assertEqual(code, 2, err)
        self.assertOneErrorLine(err)
        self.assertIn("--insecure", err)
        self.assertEqual(reg.log, [])
        self.assertEqual(asked, [])
        os.environ["REGISTRY_PULL_MIRRORS"] = "http://mirror.invalid"
        self.addCleanup(os.environ.pop, "REGISTRY_PULL_MIRRORS", None)
        code, out, err = self.main(*self.cli_args("alpine"))
        self.assertEqual(code, 2, err)
        self.assertIn("--insecure", err)
        self.assertEqual(asked, [])  # neither the mirror nor Docker Hub was looked up
        del os.environ["REGISTRY_PULL_MIRRORS"]
        mirror = self.registry()
        mirror.push("mir/app", "v1", img)
        code, out, err = self.main(*self.cli_args("--mirror", "http://" + mirror.host, reg.host + "/mir/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertTrue(mirror.requests("GET", "blobs"))
        self.assertEqual(reg.requests(kind="blobs"), [])

    def test_token_with_a_newline_is_refused_and_never_shown(self):
        reg = self.registry(auth="bearer")
        reg.push("nl/app", "v1", Image())

        def token(h, method, path):
            if path == "/token":
                h.send(200, json.dumps({"token": "SECRET\nX", "expires_in": 300}).encode(),
                       {"Content-Type": "application/json"})
                return True
            return False
        reg.fault = token
        code, out, err = self.main(*self.cli_args(reg.host + "/nl/app:v1"))
        self.assertEqual(code, 3, err)
        self.assertOneErrorLine(err)
        self.assertNotIn("SECRET", err)

    def test_server_words_never_reach_the_terminal_as_escapes(self):
        reg = self.registry()
        img = reg.push("esc/app", "v1", Image())
        body = json.dumps({"errors": [{"code": HOSTILE_CODE, "message": HOSTILE_MESSAGE}]}).encode()
        index = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": [
            {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
             "platform": {"os": "linux", "architecture": "\x1b]0;title\x07"}}]}).encode()
        reg.manifests[("esc/idx", "v1")] = (rp.MT_OCI_INDEX, index)
        by_digest = reg.host + "/esc/app@" + sha256(b"absent")  # a digest: the manifest GET, whose body is read
        cases = [
            ("404 manifest", 404, {}, by_digest, 4),
            ("403", 403, {}, by_digest, 3),
            ("401", 401, {"WWW-Authenticate": 'Basic realm="x"'}, by_digest, 3),
            ("no matching platform", None, {}, reg.host + "/esc/idx:v1", 4),
        ]
        for name, status, headers, ref, want in cases:
            with self.subTest(case=name):
                def hostile(h, method, path, status=status, headers=headers):
                    if status and "/manifests/" in path:
                        h.send(status, body, dict(headers, **{"Content-Type": "application/json"}), method == "HEAD")
                        return True
                    return False
                reg.fault = hostile
                code, out, err = self.main(*self.cli_args(ref))
                self.assertEqual(code, want, err)
                self.assertOneErrorLine(err)
                self.assertNotIn("\x1b", err)
                self.assertNotIn("\x07", err)
                self.assertIn("\\x1b", err)  # shown escaped, not dropped

    def test_auth_file_entries_keyed_by_namespace(self):
        users = {"usera": "pa", "userb": "pb", "userc": "pc"}
        reg = self.registry(auth="basic", users=users)

        def entry(user):
            return {"auth": base64.b64encode(("%s:%s" % (user, users[user])).encode()).decode()}
        path = os.path.join(self.home, "auth.json")
        with open(path, "w") as f:
            json.dump({"auths": {reg.host: entry("usera"), reg.host + "/org-b": entry("userb"),
                                 reg.host + "/org-b/app": entry("userc")}}, f)
        env = {"REGISTRY_AUTH_FILE": path, "HOME": self.home, "DOCKER_CONFIG": os.path.join(self.home, "none")}
        for repository, user in (("org-b/app", "userc"), ("org-b/app/sub", "userc"), ("org-b/other", "userb"),
                                 ("org-b/application", "userb"), ("org-a/x", "usera"), ("org-bb/x", "usera")):
            with self.subTest(case=repository):
                creds = rp.find_credentials(reg.host, env, repository=repository)
                self.assertEqual(creds.username, user)
        self.assertEqual(rp.find_credentials(reg.host, env).username, "usera")  # no repository: the host's
        with open(path, "w") as f:  # a namespace key alone covers only its namespace
            json.dump({"auths": {reg.host + "/org-b": entry("userb")}}, f)
        self.assertIsNone(rp.find_credentials(reg.host, env, repository="org-a/app"))
        with open(path, "w") as f:
            json.dump({"auths": {reg.host: entry("usera"), reg.host + "/org-b": entry("userb"),
                                 reg.host + "/org-b/app": entry("userc")}}, f)
        os.environ["REGISTRY_AUTH_FILE"] = path
        for repository, user in (("org-b/app", "userc"), ("org-b/other", "userb"), ("org-a/x", "usera")):
            with self.subTest(case="pull " + repository):
                img = reg.push(repository, "v1", Image())
                self.pull(reg, repository + ":v1")
                self.assertStoreHas(img)
                sent = set(hd.get("Authorization") for m, p, hd in reg.log
                           if p.startswith("/v2/%s/" % repository) and hd.get("Authorization"))
                self.assertEqual(sent, {"Basic " + entry(user)["auth"]})


@unittest.skipIf(sqlite3 is None, "needs the sqlite3 module: the realm is remembered in HOME/oci.db")
class RememberedRealmTests(Base):
    """The store's remembered token realm is a hint: credentials go only where this run's
    registry sends them."""

    def moved_token_service(self):
        """Pull once with credentials (realm A, the registry's /token); then the registry names
        realm B (another server) and A is gone (404). Returns (reg, img, B's host, B's log, mark)."""
        reg = self.registry(auth="bearer")
        reg.anonymous_tokens = False
        img = reg.push("realm/app", "v1", Image())
        self.pull(reg, "realm/app:v1", username="alice", password="s3cret")
        self.assertEqual(realm_row(self.home, reg.host), ("bearer", "http://%s/token" % reg.host))
        b_log = []

        class TokenB(QuietHandler):
            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                b_log.append((self.path, auth))
                if auth.startswith("Basic ") and base64.b64decode(auth[6:]) == b"alice:s3cret":
                    tok = "b-tok-%d" % len(b_log)
                    reg.tokens[tok] = time.time() + 300
                    status, body = 200, json.dumps({"token": tok, "expires_in": 300}).encode()
                else:
                    status, body = 401, b'{"errors":[{"code":"UNAUTHORIZED","message":"log in"}]}'
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        _, b_host = serve(self, TokenB)

        def fault(h, method, path):
            if path == "/token":  # the old token service moved away
                h.error(404, "NOT_FOUND", method == "HEAD")
                return True
            auth = h.headers.get("Authorization", "")
            tok = auth[7:] if auth.startswith("Bearer ") else None
            if path.startswith("/v2/") and not (tok in reg.tokens and time.time() < reg.tokens[tok]):
                m = re.match(r"^/v2/(.+)/(?:manifests|blobs)/", path)
                scope = ',scope="repository:%s:pull"' % m.group(1) if m else ""
                h.error(401, "UNAUTHORIZED", method == "HEAD", {"WWW-Authenticate":
                        'Bearer realm="http://%s/token",service="test-registry"%s' % (b_host, scope)})
                return True
            return False
        reg.fault = fault
        return reg, img, b_host, b_log, len(reg.log)

    def test_credentials_go_only_to_the_realm_this_run_was_named(self):
        """After the registry moved its token service, the remembered realm never gets the credentials."""
        reg, img, b_host, b_log, mark = self.moved_token_service()
        try:
            self.pull(reg, "realm/app:v1", username="alice", password="s3cret")
        except rp.PullError:
            pass  # what this test checks is where the credentials went
        to_a = [(m, p) for m, p, hd in reg.log[mark:] if p.startswith("/token") and "Authorization" in hd]
        self.assertEqual(to_a, [], "the remembered realm A got the credentials")

    def test_moved_token_service_is_followed_and_remembered(self):
        """After the registry moved its token service, the pull succeeds with realm B and remembers B."""
        reg, img, b_host, b_log, mark = self.moved_token_service()
        res = self.pull(reg, "realm/app:v1", username="alice", password="s3cret")
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertTrue(any(a.startswith("Basic ") for _, a in b_log), b_log)
        self.assertEqual(realm_row(self.home, reg.host), ("bearer", "http://%s/token" % b_host))


class PasswordArgumentTests(Base):
    """A password on the command line."""

    def test_password_argument_is_refused_and_never_echoed(self):
        """--password s3cret (every spelling, before or after the verb) exits 2 and 's3cret' is in neither
        stdout nor stderr."""
        reg = self.registry()
        reg.push("pw/app", "v1", Image())
        ref = reg.host + "/pw/app:v1"
        forms = [["--password", "s3cret", ref], ["-p", "s3cret", ref], ["--password=s3cret", ref], ["-ps3cret", ref],
                 [ref, "--password", "s3cret"], ["--username", "alice", "--password", "s3cret", ref],
                 ["pull", "--password", "s3cret", ref], ["inspect", "--password", "s3cret", ref],
                 ["tags", "--password", "s3cret", reg.host + "/pw/app"]]
        for argv in forms:
            with self.subTest(argv=argv):
                code, out, err = self.main("--home", self.home, *argv)
                self.assertEqual(code, 2, err)
                self.assertNotIn("s3cret", out + err)
                self.assertOneErrorLine(err)
        self.assertEqual(reg.requests(), [])  # refused before any request

    def test_a_value_given_to_password_stdin_is_never_echoed(self):
        """--password-stdin=s3cret (a password glued to the flag) exits 2 without 's3cret' on stderr."""
        code, out, err = self.main("--home", self.home, "--username", "alice", "--password-stdin=s3cret",
                                   "127.0.0.1:1/pw/app:v1")
        self.assertEqual(code, 2, err)
        self.assertNotIn("s3cret", out + err)


# --------------------------------------------------------------------------- transport and retries


class FailFastTests(Base):
    """A pull that cannot succeed ends soon and says why; one that can, does."""

    def test_timeout_option_ends_a_stalled_pull(self):
        reg = self.registry()
        img = reg.push("to/app", "v1", Image(layers=[make_layer({"big": os.urandom(1 << 20)}),
                                                      make_layer({"s": b"s"})]))
        stall = threading.Event()
        self.addCleanup(stall.set)
        reg.fault = slow_blob(reg, sha256(img.layers[0]), stall=stall)  # one chunk, then silence
        start = time.monotonic()
        code, out, err = self.main(*self.cli_args("--timeout", "2", reg.host + "/to/app:v1"))
        elapsed = time.monotonic() - start
        self.assertEqual(code, 6, err)
        self.assertIn("timeout", self.error_line(err))
        self.assertLess(elapsed, 5.0)
        self.assertEqual(self.image_rows(), [])

    def test_timeout_argument_of_pull(self):
        reg = self.registry()
        img = reg.push("to/api", "v1", Image(layers=[make_layer({"big": os.urandom(1 << 20)}),
                                                      make_layer({"s": b"s"})]))
        stall = threading.Event()
        self.addCleanup(stall.set)
        reg.fault = slow_blob(reg, sha256(img.layers[0]), stall=stall)
        start = time.monotonic()
        with self.assertRaises(rp.RegistryError) as cm:
            self.pull(reg, "to/api:v1", timeout=2)
        self.assertLess(time.monotonic() - start, 5.0)
        self.assertIn("timeout", str(cm.exception))
        self.assertEqual(cm.exception.exit_code, 6)

    def test_dripping_server_is_a_stall_resumed_then_refused(self):
        self.set_constant("STALL_SECONDS", 0.3)
        self.set_constant("STALL_BYTES", 4096)
        reg = self.registry()
        img = reg.push("drip/app", "v1", Image(layers=[make_layer({"d": os.urandom(200000)}),
                                                        make_layer({"s": b"s"})]))
        digest = sha256(img.layers[0])
        reg.fault = slow_blob(reg, digest, chunk=10, delay=0.05)  # 200 B/s, honouring Range
        cancel = threading.Event()
        outcome = {}

        def run():
            try:
                outcome["result"] = self.pull(reg, "drip/app:v1", cancel=cancel)
            except BaseException as e:
                outcome["error"] = e
        thread = threading.Thread(target=run, daemon=True)
        start = time.monotonic()
        thread.start()
        thread.join(8)
        if thread.is_alive():
            cancel.set()
            thread.join(5)
            self.fail("no stall detected: still dripping after 8 s")
        self.assertLess(time.monotonic() - start, 5.0)
        error = outcome.get("error")
        self.assertIsInstance(error, rp.RegistryError, outcome)
        self.assertEqual(error.exit_code, 6)
        self.assertIn("stall", str(error))
        ranges = [hd.get("Range") for m, p, hd in reg.log if m == "GET" and p.endswith(digest)]
        self.assertEqual(len(ranges), rp.RETRIES + 1, ranges)  # RETRIES resumes after the first try
        self.assertIsNone(ranges[0])
        self.assertTrue(all(r and r.startswith("bytes=") for r in ranges[1:]), ranges)  # resumed, as a cut is

    def test_unknown_host_fails_at_once_and_says_what_to_check(self):
        asked = self.no_network_names()
        start = time.monotonic()
        code, out, err = self.main(*self.cli_args("nonexistent.invalid:5000/x/y"))
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertEqual(code, 6, err)
        self.assertOneErrorLine(err)
        for words in ("nonexistent.invalid", "HTTPS_PROXY", "--mirror"):
            self.assertIn(words, err)
        self.assertLessEqual(asked.count("nonexistent.invalid"), 2, "a name that does not resolve was retried")

    def test_redirect_to_an_unusable_url_is_not_retried(self):
        reg = self.registry()
        img = reg.push("loc/app", "v1", Image())
        target = sha256(img.layers[1])
        for location in ("ftp://127.0.0.1/x", "http://[::1/x"):
            with self.subTest(case=location):
                reg.log.clear()
                reg.fault = lambda h, m, p, loc=location: p.endswith(target) and (
                    h.send(307, headers={"Location": loc}) or True)
                code, out, err = self.main(*self.cli_args(reg.host + "/loc/app:v1"))
                self.assertEqual(code, 6, err)
                self.assertOneErrorLine(err)
                self.assertEqual(len([p for m, p in reg.requests("GET") if p.endswith(target)]), 1)

    def test_dead_mirror_is_skipped_at_once(self):
        reg = self.registry()
        img = reg.push("dm/app", "v1", Image())
        dead = free_port()  # nothing listens: connection refused
        tries = []
        real = socket.create_connection

        def counting(address, *args, **kw):
            if address[1] == dead:
                tries.append(address)
            return real(address, *args, **kw)
        socket.create_connection = counting
        self.addCleanup(setattr, socket, "create_connection", real)
        start = time.monotonic()
        code, out, err = self.main(*self.cli_args("--mirror", "http://127.0.0.1:%d" % dead, reg.host + "/dm/app:v1"))
        self.assertLess(time.monotonic() - start, 2.0)
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        self.assertTrue(reg.requests("GET", "blobs"))  # the registry itself served the image
        self.assertLessEqual(len(tries), 2, "the dead mirror was retried: %d connection attempts" % len(tries))

    def test_retries_are_said_without_verbose(self):
        reg = self.registry()
        img = reg.push("flaky/app", "v1", Image())
        hits = []

        def flaky(h, method, path):
            if "/blobs/" in path and len(hits) < 2:
                hits.append(path)
                h.error(503, "UNAVAILABLE")
                return True
            return False
        reg.fault = flaky
        code, out, err = self.main(*self.cli_args(reg.host + "/flaky/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertEqual(len(hits), 2)
        self.assertIn("retrying", err)
        self.assertStoreHas(img)

    def test_mirror_failing_mid_download_falls_back_without_cancelling_the_caller(self):
        reg = self.registry()
        img = reg.push("fb/app", "v1", Image())
        mirror = self.registry()
        mirror.push("fb/app", "v1", img)
        missing = sha256(img.layers[1])
        del mirror.blobs[missing]  # the mirror has the manifest and the config, not this layer
        cancel = threading.Event()
        res = self.pull(reg, "fb/app:v1", mirrors=["http://" + mirror.host], cancel=cancel)
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)
        self.assertTrue(mirror.requests("GET", "blobs"), "downloads had started from the mirror")
        self.assertTrue([p for m, p in reg.requests("GET", "blobs") if p.endswith(missing)])
        self.assertFalse(cancel.is_set(), "the caller's cancel event was set by the failed mirror")
        home2 = tempfile.mkdtemp(prefix="rp-home2-")
        self.addCleanup(shutil.rmtree, home2, True)
        res = self.pull(reg, "fb/app:v1", home=home2, mirrors=["http://" + mirror.host], cancel=cancel)
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertFalse(cancel.is_set())

    def test_cut_after_every_256_kib_still_completes(self):
        reg = self.registry()
        img = reg.push("cut256/app", "v1", Image(layers=[make_layer({"big": os.urandom(2 << 20)}),
                                                          make_layer({"s": b"s"})]))
        big = sha256(img.layers[0])
        starts = []

        def cut(h, method, path):
            if not (path.endswith(big) and method == "GET"):
                return False
            data = reg.blobs[big]
            m = re.match(r"^bytes=(\d+)-$", h.headers.get("Range") or "")
            start = int(m.group(1)) if m else 0
            starts.append(start)
            h.send_response(206 if start else 200)
            h.send_header("Content-Length", str(len(data) - start))
            if start:
                h.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
            h.end_headers()
            try:
                h.wfile.write(data[start:start + 256 * 1024])  # then the line drops
                h.wfile.flush()
            except OSError:
                pass
            h.close_connection = True
            return True
        reg.fault = cut
        self.pull(reg, "cut256/app:v1")
        self.assertStoreHas(img)
        self.assertGreater(len(starts), rp.RETRIES + 1)  # more cuts than RETRIES: each one after progress
        self.assertEqual(starts, sorted(set(starts)))  # every try resumed further on

    def test_a_dripped_manifest_ends_at_the_timeout(self):
        reg = self.registry()
        reg.push("drip/man", "v1", Image())

        def drip(h, method, path):
            if "/manifests/" not in path:
                return False
            h.send_response(200)
            h.send_header("Content-Type", rp.MT_OCI_MANIFEST)
            h.send_header("Content-Length", "100000")
            h.end_headers()
            try:
                for _ in range(100):
                    h.wfile.write(b" ")
                    h.wfile.flush()
                    time.sleep(0.2)
            except OSError:
                pass
            h.close_connection = True
            return True
        reg.fault = drip
        start = time.monotonic()
        code, out, err = self.main(*self.cli_args("--timeout", "2", reg.host + "/drip/man:v1"))
        self.assertEqual(code, 6, err)
        self.assertLess(time.monotonic() - start, 5)

    def test_redirect_to_a_url_http_client_refuses_is_not_retried(self):
        """A redirect to a URL with a space in it: one attempt, exit 6, one error line."""
        reg = self.registry()
        img = reg.push("sp/app", "v1", Image())
        target = sha256(img.layers[1])
        reg.fault = lambda h, m, p: m == "GET" and p.endswith(target) and (
            h.send(307, headers={"Location": "/v2/sp/app/blobs/sha256:abc def"}) or True)
        code, out, err = self.main(*self.cli_args("--progress", "none", reg.host + "/sp/app:v1"))
        attempts = [p for m, p in reg.requests("GET") if p.endswith(target)]
        self.assertEqual(len(attempts), 1, "%d attempts; stderr: %s" % (len(attempts), err[-500:]))
        self.assertNotIn("retrying", err)
        self.assertEqual(code, 6, err)
        self.assertOneErrorLine(err)

    def test_refused_loopback_port_fails_at_once(self):
        """A loopback port nothing listens on: exit 6 in under 1 s with the real retry waits, one error line."""
        self.set_constant("RETRY_BASE", 1.0)
        self.set_constant("RETRY_MAX", 16.0)
        start = time.monotonic()
        code, out, err = self.main(*self.cli_args("--timeout", "8", "127.0.0.1:%d/x/app:v1" % free_port()))
        elapsed = time.monotonic() - start
        self.assertLess(elapsed, 1.0, err)
        self.assertEqual(code, 6, err)
        self.assertOneErrorLine(err)


class HttpClientLoopTests(Base):
    """A server keeps a request inside http.client (interim answers, a dripped header, trailers):
    --timeout still ends the pull."""

    TIMEOUT = 3

    def pull_from(self, answer_manifest):
        def answer(conn, method, path, headers, server):
            if path == "/v2/":
                return server.reply(conn, "200 OK", b"{}", [("Content-Type", "application/json")], method == "HEAD")
            if "/manifests/" in path:
                return answer_manifest(conn, server)
            return server.reply(conn, "404 Not Found", b'{"errors":[{"code":"NAME_UNKNOWN"}]}', head=method == "HEAD")
        server = RawServer(self, answer)
        code, elapsed, err = run_cli("pull", "--home", self.home, "--platform", "linux/amd64",
                                     "--timeout", str(self.TIMEOUT), server.host + "/slow/app:v1")
        self.assertTrue(any("/manifests/" in p for _, p in server.requests), server.requests)  # it got that far
        self.assertIsNotNone(code, "the pull was still running after %.0fs (--timeout %d)" % (CAP, self.TIMEOUT))
        self.assertLess(elapsed, self.TIMEOUT + 2.5, err)
        self.assertEqual(code, 6, err)

    def test_endless_100_continue_answers_end_at_the_timeout(self):
        """Endless `100 Continue` interim answers: the pull fails within --timeout + 2 s, exit 6."""
        self.pull_from(lambda conn, server: server.keep_sending(
            conn, endless(b"HTTP/1.1 100 Continue\r\n\r\n", lambda n: b"HTTP/1.1 100 Continue\r\n\r\n"), 0.05))

    def test_dripped_header_line_ends_at_the_timeout(self):
        """A header line dripped 4 bytes a second: the pull fails within --timeout + 2 s, exit 6."""
        self.pull_from(lambda conn, server: server.keep_sending(
            conn, endless(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Drip: ", lambda n: b"a"), 0.25))

    def test_endless_chunked_trailer_ends_at_the_timeout(self):
        """A chunked body followed by endless trailer lines: the pull fails within --timeout + 2 s, exit 6."""
        body = b'{"schemaVersion": 2}'
        first = (b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n"
                 % (rp.MT_OCI_MANIFEST.encode(), len(body), body))
        self.pull_from(lambda conn, server: server.keep_sending(
            conn, endless(first, lambda n: b"X-Trailer-%d: more\r\n" % n), 0.02))


class ConnectionTests(Base):
    def test_a_request_takes_the_connection_being_warmed_for_it(self):
        """A pool asked for a connection while one is still shaking hands waits for it (briefly:
        WARM_WAIT) instead of opening another; one that fails or takes longer leaves None."""
        class Slow:
            def __init__(self, delay, fail=False):
                self.delay, self.fail, self.sock, self.closed = delay, fail, None, False

            def connect(self):
                time.sleep(self.delay)
                if self.fail:
                    raise OSError("refused")
                self.sock, self.peer = socket.socketpair()

            def close(self):
                self.closed = True
                for s in (self.sock, getattr(self, "peer", None)):
                    if s is not None:
                        s.close()
        pool = rp._Pool()
        self.addCleanup(pool.close)
        made = []
        pool.warm(("k", "h", None), lambda: made.append(Slow(0.3)) or made[-1], 1)
        start = time.monotonic()
        conn = pool.get(("k", "h", None))
        self.assertIs(conn, made[0])  # waited for, not None (which would open a second one)
        self.assertGreater(time.monotonic() - start, 0.2)
        conn.close()
        self.assertEqual(pool.opened, 1)
        pool.warm(("k", "h", None), lambda: Slow(0.1, fail=True), 1)
        self.assertIsNone(pool.get(("k", "h", None)))  # it failed: the request makes its own
        self.addCleanup(setattr, rp, "WARM_WAIT", rp.WARM_WAIT)
        rp.WARM_WAIT = 0.1
        pool.warm(("k", "h", None), lambda: made.append(Slow(1.0)) or made[-1], 1)
        start = time.monotonic()
        self.assertIsNone(pool.get(("k", "h", None)))
        self.assertLess(time.monotonic() - start, 0.5)
        self.assertIsNone(pool.get(("other", "h", None)))  # nothing warming for that key: no wait

    def many_layers(self, n=6):
        return Image(layers=[make_layer({"f%d" % i: os.urandom(20000)}) for i in range(n)])

    def test_cold_pull_opens_at_most_jobs_plus_one_connections_and_a_warm_one_exactly_one(self):
        reg = self.registry()
        img = reg.push("conn/app", "v1", self.many_layers())
        opened = count_connections(reg)
        self.pull(reg, "conn/app:v1", jobs=3)
        self.assertStoreHas(img)
        requests = len(reg.log)
        # The loopback scheme probe tries HTTPS too (one connection that answers nothing); the
        # manifests share a connection that a download thread then reuses.
        self.assertLessEqual(opened[0], 3 + 1, "%d connections for %d requests" % (opened[0], requests))
        self.assertGreater(requests, opened[0])  # connections were reused
        self.assertEqual([m for m, p in reg.requests() if "/manifests/" in p], ["GET"])  # cold: no HEAD
        opened[0] = 0
        reg.log.clear()
        self.pull(reg, "conn/app:v1", jobs=3)
        self.assertEqual(opened[0], 1)
        self.assertEqual(reg.requests(), [("HEAD", "/v2/conn/app/manifests/v1")])

    def test_verbose_says_the_requests_and_connections_a_pull_made(self):
        """-v ends with "N requests, M new connections": N is what the registry received, M what it
        accepted (the loopback HTTPS probe is one more of each that it never understood)."""
        reg = self.registry()
        reg.push("conn/app", "v1", self.many_layers())
        opened = count_connections(reg)
        for cold in (True, False):
            reg.log.clear()
            opened[0] = 0
            code, out, err = self.main(*self.cli_args("-v", "--jobs", "3", reg.host + "/conn/app:v1"))
            self.assertEqual(code, 0, err)
            m = re.search(r"registry_pull: (\d+) requests?, (\d+) new connections?\n", err)
            self.assertIsNotNone(m, err)
            probe = 1 if cold else 0  # a warm store remembers the scheme
            self.assertEqual(int(m.group(1)), len(reg.log) + probe, (err, reg.requests()))
            self.assertEqual(int(m.group(2)), opened[0], err)
        self.assertEqual(m.group(0), "registry_pull: 1 request, 1 new connection\n")

    def test_basic_credentials_go_with_the_first_request_of_the_next_pull(self):
        reg = self.registry(auth="basic")
        reg.push("basic/app", "v1", Image())
        self.pull(reg, "basic/app:v1", username="alice", password="s3cret")
        reg.log.clear()
        os.unlink(os.path.join(self.home, "index.json"))  # any change; the host row stays
        with contextlib.closing(sqlite3.connect(os.path.join(self.home, "oci.db"))) as conn, conn:
            conn.execute("DELETE FROM images")  # a cold store for this reference, the host remembered
        self.pull(reg, "basic/app:v1", username="alice", password="s3cret")
        first = reg.log[0]
        self.assertTrue(first[2].get("Authorization", "").startswith("Basic "), reg.log)
        self.assertNotIn("/v2/", [p for _, p, _ in reg.log])  # no probe either

    def test_server_closing_idle_connections_costs_one_retry_not_the_pull(self):
        reg = self.registry()
        img = reg.push("idle/app", "v1", self.many_layers(5))
        dropped = []

        def close_second_request(h, method, path):
            served = getattr(h, "rp_served", 0)
            h.rp_served = served + 1
            if served == 1:  # the keep-alive connection's second request: closed unanswered
                dropped.append(path)
                h.close_connection = True
                return True
            return False
        reg.fault = close_second_request
        opened = count_connections(reg)
        code, out, err = self.main(*self.cli_args("--jobs", "2", reg.host + "/idle/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        self.assertTrue(dropped)
        self.assertNotIn("retrying", err)  # the pool's own one retry, not the retry policy's
        self.assertLessEqual(len(dropped), opened[0])  # at most one retried request per connection


class DockerHubLimitTests(Base):
    def test_pull_limit_is_said_and_a_429_explained_not_waited_out(self):
        reg = self.registry()
        reg.push("library/alpine", "v1", Image())
        state = {"limited": False}

        def hub(h, method, path):
            if "/manifests/" not in path:
                return False
            if state["limited"]:
                h.error(429, "TOOMANYREQUESTS", method == "HEAD", {"Retry-After": "3600"})
                return True
            return False
        reg.fault = hub
        real = reg.server.RequestHandlerClass.send

        def send(h, status, body=b"", headers=None, head=False):
            headers = dict(headers or {})
            if "/manifests/" in h.path:
                headers["RateLimit-Remaining"] = "76;w=21600"
            return real(h, status, body, headers, head)
        reg.server.RequestHandlerClass.send = send
        self.addCleanup(setattr, reg.server.RequestHandlerClass, "send", real)
        client = rp._Client("docker.io", endpoint=reg.host)
        with self.assertLogs("registry_pull", "INFO") as logs:
            client.request("GET", "/v2/library/alpine/manifests/v1").close()
        self.assertTrue(any("pull limit remaining 76;w=21600" in line for line in logs.output), logs.output)
        state["limited"] = True
        started = time.monotonic()
        with self.assertRaises(rp.RegistryError) as cm:
            client.request("GET", "/v2/library/alpine/manifests/v1")
        self.assertLess(time.monotonic() - started, 2)  # not an hour of Retry-After
        self.assertIn("pull limit", str(cm.exception))
        self.assertIn("--mirror", str(cm.exception))
        client.pool.close()


# --------------------------------------------------------------------------- mirrors and proxies


class ProxyTests(Base):
    def env(self, **values):
        for k, v in values.items():
            for name in (k, k.lower()):
                old = os.environ.get(name)
                os.environ[name] = v
                self.addCleanup(self._restore_env, name, old)

    def test_http_proxy_and_no_proxy(self):
        reg = self.registry(auth="bearer")
        img = reg.push("px/app", "v1", Image())
        port = reg.host.split(":")[1]
        name = "registry.invalid:" + port  # never resolved by us: only the proxy knows where it is
        proxy = ForwardProxy({name: reg.host}, allow_connect=False).start(self)
        reg_realm_host = reg.host
        self.env(HTTP_PROXY=proxy.url, HTTPS_PROXY=proxy.url, NO_PROXY="")
        res = rp.pull(name + "/px/app:v1", home=self.home, platform="linux/amd64", insecure=True)
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)
        through = [p for m, p in proxy.log if m != "CONNECT"]
        self.assertTrue([p for p in through if "/blobs/" in p])
        self.assertTrue(all(p.startswith("http://" + name) for p in through), through)
        self.assertIn(reg_realm_host, [h for _, _, hd in reg.log for h in [hd.get("Host")]])
        # NO_PROXY: the same pull goes straight to the registry (the name resolved by a stub).
        proxy.log.clear()
        shutil.rmtree(os.path.join(self.home, "blobs"))
        self.env(NO_PROXY="registry.invalid")
        real = socket.getaddrinfo

        def stub(host, *args, **kw):
            return real("127.0.0.1" if host == "registry.invalid" else host, *args, **kw)
        socket.getaddrinfo = stub
        self.addCleanup(setattr, socket, "getaddrinfo", real)
        self.pull(reg, "px/app:v1")  # warm-up of nothing: loopback is never proxied
        shutil.rmtree(os.path.join(self.home, "blobs"))
        res = rp.pull(name + "/px/app:v1", home=self.home, platform="linux/amd64", insecure=True)
        self.assertStoreHas(img)
        self.assertEqual(proxy.log, [])

    @unittest.skipUnless(REGISTRY_BIN and SKOPEO and OPENSSL, NEED_REAL)
    def test_https_proxy_connect_to_tls_registry(self):
        certs = tempfile.mkdtemp(prefix="rp-certs-")
        self.addCleanup(shutil.rmtree, certs, True)
        tls = make_ca(certs)
        dist = Distribution(self, tls=tls)
        img = Image()
        dist.push("tlsproxy/app", [img])
        name = "registry.invalid:%d" % dist.port
        proxy = ForwardProxy({name: dist.host}).start(self)
        self.env(HTTPS_PROXY=proxy.url, NO_PROXY="")
        res = rp.pull(name + "/tlsproxy/app:v1", home=self.home, platform="linux/amd64", ca_file=tls[0])
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)
        self.assertIn(("CONNECT", name), proxy.log)


@unittest.skipUnless(REGISTRY_BIN and SKOPEO, NEED_REAL)
class MirrorTests(Base):
    def test_pull_through_cache_and_dead_mirror(self):
        upstream = Distribution(self)
        img = Image()
        upstream.push("lib/app", [img])
        mirror = Distribution(self, proxy_of="http://" + upstream.host)
        dead = "http://127.0.0.1:%d" % free_port()
        code, out, err = self.main(*self.cli_args("--mirror", dead, "--mirror", "http://" + mirror.host,
                                                  upstream.host + "/lib/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertIn("mirror 127.0.0.1", err)  # the dead one was tried and said so
        self.assertStoreHas(img)
        cached = os.path.join(mirror.dir, "data", "docker", "registry", "v2", "blobs", "sha256")
        layer = sha256(img.layers[1]).split(":")[1]
        self.assertTrue(os.path.exists(os.path.join(cached, layer[:2], layer, "data")),
                        "the mirror served (and cached) the layer")
        # Only dead mirrors: the registry itself.
        shutil.rmtree(os.path.join(self.home, "blobs"))
        res = rp.pull(upstream.host + "/lib/app:v1", home=self.home, platform="linux/amd64", mirrors=[dead])
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)

    def test_docker_hub_mirrors_from_environment(self):
        upstream = Distribution(self)
        img = Image()
        upstream.push("library/alpine", [img], tag="3.20")
        mirror = Distribution(self, proxy_of="http://" + upstream.host)
        os.environ["REGISTRY_PULL_MIRRORS"] = "http://%s" % mirror.host
        self.addCleanup(os.environ.pop, "REGISTRY_PULL_MIRRORS", None)
        res = rp.pull("alpine:3.20", home=self.home, platform="linux/amd64")  # docker.io, via the mirror only
        self.assertEqual(res.reference, "docker.io/library/alpine:3.20")
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)

    def test_bad_mirror_url(self):
        code, out, err = self.main("--home", self.home, "--mirror", "ftp://x/y", "alpine")
        self.assertEqual(code, 2, err)
        self.assertIn("invalid mirror", err)


# --------------------------------------------------------------------------- manifests


class PullTests(Base):
    def test_oci_index_each_platform(self):
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8"), Image("arm", "v7")]
        index_digest = reg.push_index("multi/app", "1.0", images)
        for plat, img in (("linux/amd64", images[0]), ("linux/arm64", images[1]), ("linux/arm/v7", images[2])):
            with self.subTest(case=plat):
                res = self.pull(reg, "multi/app:1.0", platform=plat)
                self.assertEqual(res.manifest_digest, img.digest)
                self.assertEqual(res.index_digest, index_digest)
                self.assertEqual(res.platform.architecture, img.arch)
                self.assertStoreHas(img)
        # Attestation manifests were never requested.
        self.assertFalse([p for _, p in reg.requests() if "att" in p])
        for img in images:
            self.assertEqual(len([p for m, p in reg.requests("GET", "blobs") if img.layers[1] and
                                  sha256(img.layers[1]) in p]), 1)

    def test_docker_manifest_list(self):
        reg = self.registry()
        images = [Image("amd64", types=DOCKER), Image("arm64", "v8", types=DOCKER)]
        reg.push_index("d/list", "latest", images, types=DOCKER, attestations=False)
        res = self.pull(reg, "d/list", platform="linux/arm64/v8")
        self.assertEqual(res.manifest_digest, images[1].digest)
        self.assertEqual(res.manifest_media_type, rp.MT_DOCKER_MANIFEST)
        self.assertStoreHas(images[1])

    def test_reference_straight_to_manifest(self):
        reg = self.registry()
        img = reg.push("single", "v1", Image("arm64", "v8"))
        res = self.pull(reg, "single:v1", platform="linux/arm64")  # no index: the manifest is the image
        self.assertEqual(res.platform_match, "exact")
        self.assertIsNone(res.index_digest)
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertEqual(str(res.platform), "linux/arm64/v8")
        self.assertEqual(res.size, img.size)
        self.assertStoreHas(img)

    def test_pull_by_digest_verifies_manifest(self):
        reg = self.registry()
        img = reg.push("byd", "v1", Image())
        res = self.pull(reg, "byd@" + img.digest)
        self.assertEqual(res.manifest_digest, img.digest)
        # The registry serves other bytes under that digest: refused.
        other = Image()
        reg.manifests[("byd", other.digest)] = (rp.MT_OCI_MANIFEST, img.manifest)
        reg.blobs.update(other.blobs())
        with self.assertRaises(rp.DigestMismatch):
            self.pull(reg, "byd@" + other.digest)

    def test_manifest_digest_header_checked(self):
        reg = self.registry()
        img = reg.push("hdr", "v1", Image())

        def lie(h, method, path):
            if "/manifests/" in path:
                h.send(200, img.manifest, {"Content-Type": rp.MT_OCI_MANIFEST,
                                           "Docker-Content-Digest": sha256(b"other")}, method == "HEAD")
                return True
        reg.fault = lie
        with self.assertRaises(rp.DigestMismatch):
            self.pull(reg, "hdr:v1")
        self.assertEqual(self.image_rows(), [])

    def test_warm_repull_costs_one_manifest_request(self):
        reg = self.registry(auth="bearer")
        reg.push_index("warm/app", "latest", [Image("amd64"), Image("arm64", "v8")])
        self.pull(reg, "warm/app")
        reg.log.clear()
        res = self.pull(reg, "warm/app")
        registry_requests = [(m, p) for m, p in reg.requests() if p.startswith("/v2/")]
        manifest_ok = [r for r in registry_requests if "/manifests/" in r[1]]
        self.assertEqual(reg.requests(kind="blobs"), [])
        # The store remembers the host's scheme and challenge: the token is fetched first and one
        # HEAD is the only request to the registry.
        self.assertEqual(registry_requests, [("HEAD", "/v2/warm/app/manifests/latest")])
        self.assertEqual(manifest_ok, registry_requests)
        self.assertEqual(res.downloaded_bytes, 0)

    def test_head_405_falls_back_to_get(self):
        reg = self.registry()
        reg.head_allowed = False
        img = reg.push("nohead", "v1", Image())
        self.pull(reg, "nohead:v1")
        self.assertStoreHas(img)
        self.assertIn(("GET", "/v2/nohead/manifests/v1"), reg.requests())

    def warm_repull_with_head(self, status, code_name):
        reg = self.registry()
        img = reg.push("head/app", "v1", Image())
        self.pull(reg, "head/app:v1")
        mark = len(reg.log)
        reg.fault = lambda h, m, p: m == "HEAD" and "/manifests/" in p and (h.error(status, code_name, True) or True)
        code, out, err = self.main(*self.cli_args(reg.host + "/head/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertIn(("GET", "/v2/head/app/manifests/v1"), [(m, p) for m, p, _ in reg.log[mark:]])
        self.assertStoreHas(img)

    def test_warm_repull_falls_back_to_get_when_head_says_404(self):
        """Manifest HEAD answered 404 while GET works: the warm re-pull falls back to GET and succeeds."""
        self.warm_repull_with_head(404, "MANIFEST_UNKNOWN")

    def test_warm_repull_falls_back_to_get_when_head_says_403(self):
        """Manifest HEAD answered 403 while GET works: the warm re-pull falls back to GET and succeeds."""
        self.warm_repull_with_head(403, "DENIED")

    def test_schema1_refused(self):
        reg = self.registry()
        reg.manifests[("old", "v1")] = (rp.MT_DOCKER_SCHEMA1[1], json.dumps(
            {"schemaVersion": 1, "name": "old", "tag": "v1", "fsLayers": []}).encode())
        with self.assertRaises(rp.UnsupportedError) as cm:
            self.pull(reg, "old:v1")
        self.assertIn("schema 1", str(cm.exception))

    def test_manifest_cap(self):
        reg = self.registry()
        big = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_MANIFEST,
                          "annotations": {"x": "y" * (4 * 1024 * 1024)}}).encode()
        reg.manifests[("big", "v1")] = (rp.MT_OCI_MANIFEST, big)
        with self.assertRaises(rp.IntegrityError) as cm:
            self.pull(reg, "big:v1")
        self.assertIn("larger than", str(cm.exception))

    @unittest.skipIf(sqlite3 is None, "this Python has no sqlite3 module")
    def test_database_rows(self):
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8")]
        index_digest = reg.push_index("db/app", "2", images)
        res = self.pull(reg, "db/app:2")
        with contextlib.closing(sqlite3.connect(os.path.join(self.home, "oci.db"))) as conn:
            self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], rp._SCHEMA_VERSION)
            self.assertEqual(conn.execute("PRAGMA journal_mode").fetchone()[0], "wal")
            row = conn.execute("SELECT id, reference, size_bytes, manifest_digest, index_digest, platform "
                               "FROM images").fetchone()
            self.assertEqual(row[1:], (res.reference, images[0].size, images[0].digest, index_digest,
                                       "linux/amd64"))
            idx = conn.execute("SELECT media_type, platform_os, platform_arch, digest FROM indexes "
                               "WHERE image_id = ?", (row[0],)).fetchone()
            self.assertEqual(idx, (rp.MT_OCI_INDEX, "linux", "amd64", index_digest))
            man = conn.execute("SELECT id, media_type, digest FROM manifests WHERE image_id = ?",
                               (row[0],)).fetchone()
            self.assertEqual(man[1:], (rp.MT_OCI_MANIFEST, images[0].digest))
            cfg = conn.execute("SELECT architecture, os, config_env_json, config_cmd_json, rootfs_diff_ids_json,"
                               " config_exposed_ports_json FROM configs WHERE manifest_id = ?",
                               (man[0],)).fetchone()
            self.assertEqual(cfg[:2], ("amd64", "linux"))
            self.assertEqual(json.loads(cfg[2]), ["PATH=/usr/bin"])
            self.assertEqual(json.loads(cfg[3]), ["/bin/sh"])
            self.assertEqual(len(json.loads(cfg[4])), 2)
            layers = conn.execute("SELECT l.digest, l.size_bytes, l.diff_id FROM manifest_layers ml JOIN layers l "
                                  "ON l.id = ml.layer_id WHERE ml.manifest_id = ? ORDER BY ml.position",
                                  (man[0],)).fetchall()
            self.assertEqual([x[0] for x in layers], [sha256(b) for b in images[0].layers])
            self.assertEqual([x[2] for x in layers], json.loads(cfg[4]))
            # Every table has id, created_at and modified_at; foreign keys cascade.
            for table in ("images", "indexes", "manifests", "configs", "layers", "manifest_layers"):
                cols = [c[1] for c in conn.execute("PRAGMA table_info(%s)" % table)]
                self.assertTrue({"id", "created_at", "modified_at"} <= set(cols), table)
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("DELETE FROM images")
            self.assertEqual(conn.execute("SELECT COUNT(*) FROM manifest_layers").fetchone()[0], 0)
            # Nothing secret is ever stored.
            conn.commit()
        with open(os.path.join(self.home, "oci.db"), "rb") as f:
            self.assertNotIn(b"tok-", f.read())

    def test_failed_pull_leaves_no_image_row(self):
        reg = self.registry()
        img = reg.push("fail/app", "v1", Image())
        del reg.blobs[sha256(img.layers[1])]
        with self.assertRaises(rp.NotFound):
            self.pull(reg, "fail/app:v1")
        self.assertEqual(self.image_rows(), [])

    def test_progress_callback(self):
        reg = self.registry()
        img = reg.push("prog", "v1", Image())
        seen = {}
        self.pull(reg, "prog:v1", progress=lambda d, done, total: seen.__setitem__(d, (done, total)))
        self.assertEqual(seen, dict((d, (len(b), len(b))) for d, b in img.blobs().items()))

    def test_unsupported_layer_media_type(self):
        reg = self.registry()
        img = Image()
        doc = json.loads(img.manifest)
        doc["layers"][0]["mediaType"] = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
        data = json.dumps(doc).encode()
        reg.blobs.update(img.blobs())
        reg.manifests[("art", "v1")] = (rp.MT_OCI_MANIFEST, data)
        # Not an image: an artifact, pulled as it is; extracting it is refused, naming its type.
        res = self.pull(reg, "art:v1")
        self.assertEqual(res.artifact_type, rp.MT_OCI_CONFIG)
        self.assertStoreHas(img)
        with self.assertRaises(rp.UnsupportedError) as cm:
            self.pull(reg, "art:v1", rootfs=os.path.join(self.home, "root"))
        self.assertIn("not a container image", str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(self.home, "root")))


class HostileInputTests(Base):
    def test_tar_headers_parse_as_tarfile_parses_them(self):
        """The layer reader's one-go header parse gives tarfile's result, field for field or the
        same error, on headers of every format and on broken ones."""
        fast = rp._layer_tarinfo()
        headers = sample_headers()
        self.assertGreater(len(headers), 30)
        for buf in headers:
            with self.subTest(header=buf[:40]):
                self.assertEqual(parsed_header(fast, buf), parsed_header(tarfile.TarInfo, buf))

    def test_every_terminal_control_character_is_escaped(self):
        """What a server says reaches the terminal with C0/C1 controls, line separators and
        bidi overrides escaped (the fast path for printable text skips none of them)."""
        controls = [chr(c) for c in list(range(0x20)) + list(range(0x7f, 0xa0))] + \
            ["\u2028", "\u2029"] + [chr(c) for c in range(0x202a, 0x202f)] + [chr(c) for c in range(0x2066, 0x206a)]
        for c in controls:
            with self.subTest(char=hex(ord(c))):
                shown = rp._printable("a" + c + "b")
                self.assertNotIn(c, shown)
                self.assertEqual(shown, "a\\x%02xb" % ord(c) if ord(c) < 0x100 else "a\\u%04xb" % ord(c))
        for text in ("plain text", "caf\u00e9 \u65e5\u672c", "tab-free; 100% {json}"):
            self.assertEqual(rp._printable(text), text)
        self.assertEqual(rp._printable("x" * 400), "x" * 300 + "...")

    def serve_manifest(self, reg, name, data, media_type=rp.MT_OCI_MANIFEST):
        reg.manifests[(name, "v1")] = (media_type, data)

    def test_a_pax_header_of_one_long_keyword_is_refused_in_one_pass(self):
        """A 200-byte gzip layer of "2 2 2 ...=" made tarfile before 3.12.6 / 3.11.10 hold
        gigabytes (its record pattern ran from every start to the one "="): refused as hostile,
        in layers and in a docker-archive's own headers, whatever the Python."""
        body = b"2 " * 20000 + b"="
        pax = tarfile.TarInfo("././@PaxHeader")
        pax.type, pax.size = tarfile.XHDTYPE, len(body)
        f = tarfile.TarInfo("f")
        raw = pax.tobuf(tarfile.USTAR_FORMAT) + body + b"\0" * (-len(body) % 512) + f.tobuf(tarfile.USTAR_FORMAT) + \
            b"\0" * 1024
        layer = gzip.compress(raw, mtime=0)
        self.assertLess(len(layer), 1000)
        reg = self.registry()
        reg.push("pax/app", "v1", Image(layers=[(layer, sha256(raw))]))
        for out in ("--rootfs", "--tar"):
            with self.subTest(output=out):
                code, _, err = self.main(*self.cli_args(out, os.path.join(self.home, "out" + out),
                                                        reg.host + "/pax/app:v1"))
                self.assertEqual(code, 5, err)
                self.assertIn("malformed pax header record", err)
                self.assertFalse(os.path.exists(os.path.join(self.home, "out" + out)))
        archive = os.path.join(self.home, "pax.tar")
        with open(archive, "wb") as a:
            a.write(raw)
        code, _, err = self.main("--home", self.home, "docker-archive:" + archive)
        self.assertEqual(code, 5, err)
        self.assertIn("the archive has a malformed pax header record", err)
        # Well-formed records of every kind still pass the check (the xattr and long-name tests read them too).
        rp._check_pax_records(b"30 path=" + b"a" * 21 + b"\n" + b"19 SCHILY.xattr.k=\n" + b"\0" * 100)

    def test_malformed_manifests(self):
        # Where the traversal digest would land: another program's file may be there already.
        stray = os.path.join(os.path.dirname(self.home), "x")

        def seen():
            st = os.lstat(stray) if os.path.lexists(stray) else None
            return st and (st.st_ino, st.st_mtime_ns, st.st_size)
        before = seen()
        reg = self.registry()
        img = Image()
        reg.blobs.update(img.blobs())
        good = json.loads(img.manifest)

        def variant(**changes):
            doc = json.loads(json.dumps(good))
            for key, value in changes.items():
                if key.startswith("layer_"):
                    doc["layers"][0][key[6:]] = value
                else:
                    doc[key] = value
            return json.dumps(doc).encode()

        cases = [
            ("not-json", b"{not json", 5),
            ("array", b"[1, 2]", 5),
            ("nested", b"[" * 100000 + b"]" * 100000, 5),
            ("nested-object", b'{"a":' * 50000 + b"1" + b"}" * 50000, 5),
            ("no-layers", variant(layers="x"), 5),
            ("size-negative", variant(layer_size=-1), 5),
            ("size-string", variant(layer_size="12"), 5),
            ("size-bool", variant(layer_size=True), 5),
            ("digest-traversal", variant(layer_digest="sha256:../../../../x"), 5),
            ("digest-upper", variant(layer_digest="sha256:" + "A" * 64), 5),
            ("digest-short", variant(layer_digest="sha256:abc"), 5),
            ("digest-algo", variant(layer_digest="md5:" + "a" * 32), 1),
            ("digest-missing", variant(layer_digest=None), 5),
            ("media-type-disagrees", variant(mediaType="application/vnd.example.thing+json"), 5),
            ("not-utf8", b"\xff\xfe{}", 5),
        ]
        for name, data, code in cases:
            with self.subTest(case=name):
                self.serve_manifest(reg, "bad/" + name, data)
                got, out, err = self.main(*self.cli_args(reg.host + "/bad/%s:v1" % name))
                self.assertEqual(got, code, err)
                self.assertEqual(err.count("\n"), 1, err)
        self.serve_manifest(reg, "bad/unknown-type", variant(mediaType="application/vnd.example.thing+json"),
                            "application/vnd.example.thing+json")
        got, out, err = self.main("--home", self.home, reg.host + "/bad/unknown-type:v1")
        self.assertEqual(got, 1, err)
        self.assertIn("unsupported media type", err)
        self.assertEqual(self.stray_files(), [])
        self.assertEqual(os.listdir(self.home), ["blobs"])  # no image: not even a database
        self.assertEqual(seen(), before)  # not made, not written

    def test_diff_ids_disagree_with_layers(self):
        reg = self.registry()
        img = Image().edit(config=lambda cfg: cfg["rootfs"]["diff_ids"].append(sha256(b"extra")))
        reg.push("diffs/app", "v1", img)
        with self.assertRaises(rp.IntegrityError) as cm:
            self.pull(reg, "diffs/app:v1")
        self.assertIn("diff_ids", str(cm.exception))
        self.assertEqual(self.image_rows(), [])

    def test_nested_indexes_refused(self):
        reg = self.registry()
        img = reg.push("nest/app", None, Image())
        inner = {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
                 "platform": {"os": "linux", "architecture": "amd64"}}
        for depth in range(6):
            data = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": [inner]}).encode()
            reg.manifests[("nest/app", sha256(data))] = (rp.MT_OCI_INDEX, data)
            inner = {"mediaType": rp.MT_OCI_INDEX, "digest": sha256(data), "size": len(data),
                     "platform": {"os": "linux", "architecture": "amd64"}}
            if depth == 1:
                reg.manifests[("nest/app", "two")] = (rp.MT_OCI_INDEX, data)
        reg.manifests[("nest/app", "six")] = (rp.MT_OCI_INDEX, data)
        self.assertEqual(self.pull(reg, "nest/app:two").manifest_digest, img.digest)  # nesting is legal
        with self.assertRaises(rp.IntegrityError) as cm:
            self.pull(reg, "nest/app:six")
        self.assertIn("nested", str(cm.exception))

    def test_redirect_to_other_schemes_refused(self):
        reg = self.registry()
        reg.push("loc/app", "v1", Image())
        for location in ("file:///etc/passwd", "ftp://127.0.0.1/x", "gopher://127.0.0.1:70/x", "//"):
            with self.subTest(case=location):
                reg.fault = lambda h, m, p, loc=location: "/blobs/" in p and (
                    h.send(307, headers={"Location": loc}) or True)
                with self.assertRaises(rp.RegistryError) as cm:
                    self.pull(reg, "loc/app:v1")
                self.assertIn("redirect", str(cm.exception))

    def test_public_registry_redirect_to_private_refused(self):
        client = rp._Client("registry.example.com")
        client.targets.public, client.scheme = True, "https"  # as if it resolved to a public address
        for url in ("https://127.0.0.1/blob", "https://10.1.2.3/blob", "https://169.254.169.254/latest/meta-data",
                    "https://[::1]/x", "https://192.168.0.10/x", "https://[fd00::1]/x"):
            with self.subTest(case=url):
                with self.assertRaises(rp.RegistryError) as cm:
                    client.targets.follow("https://registry.example.com/v2/a/blobs/x", url)
                self.assertIn("non-public", str(cm.exception))
        url, own = client.targets.follow("https://registry.example.com/v2/a/blobs/x", "https://8.8.8.8/x")
        self.assertFalse(own)  # another host: no Authorization goes there
        url, own = client.targets.follow("https://registry.example.com/v2/a/blobs/x", "/v2/a/blobs/y")
        self.assertTrue(own)
        with self.assertRaises(rp.RegistryError):  # and no downgrade to plain HTTP
            client.targets.follow("https://registry.example.com/v2/a/blobs/x", "http://8.8.8.8/x")

    def test_one_digest_with_two_sizes_is_refused(self):
        layer = {"mediaType": LAYER_TYPE["gzip"], "digest": "sha256:" + "a" * 64}
        doc = {"schemaVersion": 2, "mediaType": rp.MT_OCI_MANIFEST,
               "config": {"mediaType": rp.MT_OCI_CONFIG, "digest": "sha256:" + "b" * 64, "size": 2},
               "layers": [dict(layer, size=98), dict(layer, size=97)]}
        with self.assertRaises(rp.IntegrityError):
            rp.parse_manifest(json.dumps(doc).encode())

    def test_a_tag_list_that_links_back_ends(self):
        reg = self.registry()
        reg.push("loop/app", "v1", Image())

        def loop(h, method, path):
            if "/tags/list" not in path:
                return False
            h.send(200, json.dumps({"name": "loop/app", "tags": ["v1"]}).encode(),
                   {"Content-Type": "application/json", "Link": '</v2/loop/app/tags/list?n=1>; rel="next"'})
            return True
        reg.fault = loop
        with self.assertRaises(rp.IntegrityError):
            rp.list_tags(reg.host + "/loop/app", page_size=1)


class TagListBoundTests(Base):
    """A tag listing is bounded and its tags are valid."""

    def endless_pages(self, reg, tags_on_page):
        def fault(h, method, path):
            if not path.endswith("/tags/list"):
                return False
            n = len(reg.log)
            body = json.dumps({"name": "x/app", "tags": tags_on_page(n)}).encode()
            h.send(200, body, {"Content-Type": "application/json",
                               "Link": '</v2/x/app/tags/list?n=1&last=%d>; rel="next"' % n}, method == "HEAD")
            return True
        reg.fault = fault

    def test_endless_empty_pages_are_cut_off(self):
        """Empty tag pages that each link to a new page: the listing stops by itself (exit 5), soon."""
        reg = self.registry()
        self.endless_pages(reg, lambda n: [])
        code, elapsed, err = run_cli("tags", reg.host + "/x/app")
        self.assertIsNotNone(code, "still listing after %.0fs: %d pages asked" % (CAP, len(reg.log)))
        self.assertEqual(code, 5, err)

    def test_page_cap_ends_a_listing_that_never_ends(self):
        """Pages with one new tag each, forever: MAX_TAG_PAGES (set to 20 here) ends the listing, IntegrityError."""
        self.set_constant("MAX_TAG_PAGES", 20)  # 10,000 by default: ~8 min at this server's pace
        reg = self.registry()
        self.endless_pages(reg, lambda n: ["t%d" % n])
        outcome = []

        def run():
            try:
                outcome.append(rp.list_tags(reg.host + "/x/app", timeout=CAP + 3))  # the safety net
            except Exception as e:
                outcome.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(8)
        self.assertFalse(t.is_alive(), "still listing after 8s: %d pages asked" % len(reg.log))
        self.assertIsInstance(outcome[0], rp.IntegrityError)
        self.assertLessEqual(len(reg.requests("GET")), 30)

    def test_overlong_tag_name_is_refused(self):
        """A 15 MB tag name in a tag page is refused: tags must match the tag grammar, exit 5."""
        reg = self.registry()
        huge = "a" * (15 * 1024 * 1024)
        body = json.dumps({"name": "x/app", "tags": ["v1", huge]}).encode()
        reg.fault = lambda h, m, p: p.endswith("/tags/list") and (
            h.send(200, body, {"Content-Type": "application/json"}, m == "HEAD") or True)
        code, out, err = self.main("tags", reg.host + "/x/app")
        self.assertEqual(code, 5, "%s / stdout %d bytes" % (err[:300], len(out)))
        self.assertOneErrorLine(err)

    def test_link_without_angle_brackets_is_followed(self):
        """A `Link: /v2/...; rel="next"` without angle brackets is followed to the last page."""
        reg = self.registry()
        first, second = ["t%d" % i for i in range(10)], ["t%d" % i for i in range(10, 20)]

        def fault(h, method, path):
            if not path.endswith("/tags/list"):
                return False
            q = urllib.parse.parse_qs(urllib.parse.urlsplit(h.path).query)
            if q.get("last") == ["t9"]:
                h.send(200, json.dumps({"name": "lk/app", "tags": second}).encode(),
                       {"Content-Type": "application/json"})
            else:
                h.send(200, json.dumps({"name": "lk/app", "tags": first}).encode(),
                       {"Content-Type": "application/json", "Link": '/v2/lk/app/tags/list?n=10&last=t9; rel="next"'})
            return True
        reg.fault = fault
        self.assertEqual(rp.list_tags(reg.host + "/lk/app", timeout=10), first + second)


class InspectFetchTests(Base):
    """inspect fetches a bounded number of documents and writes no store of its own."""

    def test_inspect_of_a_large_index_fetches_a_bounded_number_and_stores_only_what_it_shows(self):
        """Inspecting a 100-platform index asks at most 40 manifests and stores only index, chosen manifest, config."""
        reg = self.registry()
        imgs = [Image(arch="amd64", layers=[make_layer({"a": b"amd64"})])] + [
            Image(arch="arm64", variant="v%d" % i, layers=[make_layer({"a": b"%d" % i})]) for i in range(99)]
        top = reg.push_index("many/app", "v1", imgs, attestations=False)
        doc = rp.inspect(reg.host + "/many/app:v1", home=self.home, platform="linux/amd64", timeout=30)
        self.assertEqual(doc["ManifestDigest"], imgs[0].digest)
        gets = reg.requests("GET", "manifests")
        self.assertLessEqual(len(gets), 40, "inspect asked %d manifests of a 100-entry index" % len(gets))
        extra = store_files(self.home) - hexes(top, imgs[0].digest, sha256(imgs[0].config))
        self.assertEqual(len(extra), 0, "%d files stored beyond the index, manifest and config shown" % len(extra))

    def test_inspect_never_makes_a_store(self):
        """inspect with home= a directory that does not exist works and does not create it."""
        reg = self.registry()
        img = reg.push("ro/app", "v1", Image())
        fresh = os.path.join(self.home, "never-made")
        doc = rp.inspect(reg.host + "/ro/app:v1", home=fresh, platform="linux/amd64", timeout=30)
        self.assertEqual(doc["ManifestDigest"], img.digest)
        self.assertFalse(os.path.exists(fresh), "inspect made a store at %s" % fresh)


FUZZ_CASES = int(os.environ.get("RP_FUZZ_CASES", "10000"))


@unittest.skipUnless(hypothesis, "needs hypothesis (pip install hypothesis); .ci/run installs it")
class FuzzTests(unittest.TestCase):
    def fuzz(self, strategy, check):
        @hypothesis.settings(max_examples=FUZZ_CASES, deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        @hypothesis.given(strategy)
        def run(value):
            check(value)
        run()

    def test_reference_parser(self):
        alphabet = st.sampled_from(list("abcAZ019._-/:@[]") + ["sha256:", "sha512:", "localhost", "a" * 64, ".."])
        texts = st.one_of(st.text(max_size=300), st.lists(alphabet, max_size=40).map("".join))

        def check(text):
            try:
                r = rp.parse_reference(text)
            except rp.InvalidReference:
                return
            self.assertEqual(rp.parse_reference(str(r)), r)  # normalising is idempotent
            if r.digest:
                rp.check_digest(r.digest)
        self.fuzz(texts, check)

    def test_www_authenticate_parser(self):
        alphabet = st.sampled_from(['Bearer ', 'Basic ', 'realm=', 'service=', 'scope=', '"', '\\', ',', ' ',
                                    'a', '=', 'error="invalid_token"', 'x:y,z'])
        texts = st.one_of(st.text(max_size=300), st.lists(alphabet, max_size=40).map("".join))

        def check(text):
            for scheme, params in rp.parse_www_authenticate(text):
                self.assertIsInstance(scheme, str)
                self.assertTrue(all(isinstance(k, str) and isinstance(v, str) for k, v in params.items()))
        self.fuzz(texts, check)

    def test_tar_header_parser(self):
        """Random changes to real headers: the fast parse agrees with tarfile's, always."""
        fast = rp._layer_tarinfo()
        bases = [h for h in sample_headers() if len(h) == 512]
        edits = st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=8)

        def check(case):
            base, changes, fix_sum = case
            buf = bytearray(bases[base % len(bases)])
            for at, value in changes:
                buf[at] = value
            if fix_sum:
                buf[148:156] = b"        "
                buf[148:156] = b"%06o\0 " % sum(buf)
            self.assertEqual(parsed_header(fast, bytes(buf)), parsed_header(tarfile.TarInfo, bytes(buf)))
        self.fuzz(st.tuples(st.integers(0, 1000), edits, st.booleans()), check)

    def test_manifest_parser(self):
        leaves = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20),
                           st.sampled_from(["sha256:" + "a" * 64, rp.MT_OCI_MANIFEST, rp.MT_OCI_INDEX,
                                            rp.MT_OCI_CONFIG, "application/vnd.oci.image.layer.v1.tar+gzip"]))
        keys = st.sampled_from(["schemaVersion", "mediaType", "config", "layers", "manifests", "digest", "size",
                                "platform", "annotations", "os", "architecture", "variant"])
        docs = st.recursive(leaves, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                           st.dictionaries(keys, kids, max_size=6)), max_leaves=30)
        blobs = st.one_of(docs.map(lambda d: json.dumps(d).encode()), st.binary(max_size=200))
        types = st.sampled_from(["", rp.MT_OCI_INDEX, rp.MT_OCI_MANIFEST, rp.MT_DOCKER_LIST,
                                 rp.MT_DOCKER_SCHEMA1[1], "application/json"])

        def check(args):
            data, content_type = args
            try:
                m = rp.parse_manifest(data, content_type)
            except rp.PullError:
                return
            for d in m.manifests + m.layers + ((m.config,) if m.config else ()):
                rp.check_digest(d.digest)
        self.fuzz(st.tuples(blobs, types), check)


class ArtifactTests(Base):
    def test_output_files_are_copies_not_links_to_the_store(self):
        reg = self.registry()
        push_artifact(reg, "art/cfg", "v1", Artifact({"values.yaml": b"replicas: 1\n"}))
        out_dir = os.path.join(self.home, "out")
        self.pull(reg, "art/cfg:v1", output=out_dir)
        path = os.path.join(out_dir, "values.yaml")
        self.assertEqual(os.stat(path).st_nlink, 1)  # editing it in place must not edit the store
        with open(path, "r+b") as f:
            f.write(b"replicas: 9\n")
        self.assertEqual(self.main("verify", "--home", self.home)[0], 0)

    def test_an_artifact_is_pulled_recorded_and_written_out(self):
        reg = self.registry()
        art = push_artifact(reg, "art/chart", "v1", Artifact({"chart.tgz": b"tgz" * 1000, "dir/values.yaml": b"a: 1\n"}))
        out_dir = os.path.join(self.home, "out")
        layout = os.path.join(self.home, "layout")
        res = self.pull(reg, "art/chart:v1", output=out_dir, oci_layout=layout)
        self.assertEqual(res.artifact_type, "application/vnd.example.thing.v1")
        with open(os.path.join(out_dir, "chart.tgz"), "rb") as f:
            self.assertEqual(f.read(), b"tgz" * 1000)
        with open(os.path.join(out_dir, "dir", "values.yaml"), "rb") as f:
            self.assertEqual(f.read(), b"a: 1\n")
        with open(os.path.join(layout, "blobs", "sha256", art.digest.split(":")[1]), "rb") as f:
            self.assertEqual(f.read(), art.manifest)  # unchanged
        with contextlib.closing(sqlite3.connect(os.path.join(self.home, "oci.db"))) as conn:
            rows = conn.execute("SELECT artifact_type FROM manifests").fetchall()
        self.assertEqual(rows, [("application/vnd.example.thing.v1",)])
        # Again: every file exists now, and a pulled file never replaces one.
        code, out, err = self.main(*self.cli_args("--output", out_dir, reg.host + "/art/chart:v1"))
        self.assertEqual(code, 7, err)
        self.assertIn("exists", err)

    def test_output_is_all_or_nothing(self):
        """One title that names an existing file (or a file where a directory must be) refuses
        the whole --output, before any file is written: no half of an artifact next to the user's."""
        reg = self.registry()
        push_artifact(reg, "art/three", "v1", Artifact({"a.txt": b"a", "b.txt": b"b", "d/c.txt": b"c"}))
        for blocker, code_wanted in (("b.txt", 7), ("d", 7)):
            with self.subTest(blocker=blocker):
                out_dir = os.path.join(self.home, "out-" + blocker.replace("/", "_"))
                os.makedirs(out_dir)
                with open(os.path.join(out_dir, blocker), "wb") as f:
                    f.write(b"mine")
                code, out, err = self.main(*self.cli_args("--output", out_dir, reg.host + "/art/three:v1"))
                self.assertEqual(code, code_wanted, err)
                self.assertIn(os.path.join(out_dir, blocker), err)
                self.assertEqual(os.listdir(out_dir), [blocker])
                with open(os.path.join(out_dir, blocker), "rb") as f:
                    self.assertEqual(f.read(), b"mine")

    def test_titles_are_checked_as_tar_names(self):
        reg = self.registry()
        for title in ("../escape", "/etc/passwd", "a/../../b"):
            with self.subTest(title=title):
                push_artifact(reg, "art/evil", "v1", Artifact({title: b"x"}))
                code, out, err = self.main(*self.cli_args("--output", os.path.join(self.home, "o"),
                                                          reg.host + "/art/evil:v1"))
                self.assertEqual(code, 5, err)
        outside = tempfile.mkdtemp(prefix="rp-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        out_dir = os.path.join(self.home, "linked")
        os.makedirs(out_dir)
        os.symlink(outside, os.path.join(out_dir, "sub"))
        push_artifact(reg, "art/link", "v1", Artifact({"sub/file": b"x"}))
        code, out, err = self.main(*self.cli_args("--output", out_dir, reg.host + "/art/link:v1"))
        self.assertEqual(code, 5, err)
        self.assertEqual(os.listdir(outside), [])

    def test_rootfs_and_docker_archive_refuse_an_artifact(self):
        reg = self.registry()
        push_artifact(reg, "art/thing", "v1", Artifact({"f": b"x"}))
        for flag in ("--rootfs", "--docker-archive"):
            with self.subTest(flag=flag):
                target = os.path.join(self.home, "t" + flag)
                code, out, err = self.main(*self.cli_args(flag, target, reg.host + "/art/thing:v1"))
                self.assertEqual(code, 1, err)
                self.assertIn("application/vnd.example.thing.v1", err)
                self.assertFalse(os.path.exists(target))

    def test_raw_documents_byte_for_byte(self):
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8")]
        index = reg.push_index("raw/app", "v1", images)
        ref = reg.host + "/raw/app:v1"
        served = reg.manifests[("raw/app", "v1")][1]
        for argv, want in ((["--raw"], served), (["--raw", "--platform", "linux/arm64"], images[1].manifest),
                           (["--config", "--platform", "linux/arm64"], images[1].config)):
            with self.subTest(argv=argv):
                proc = subprocess.run([sys.executable, os.path.join(HERE, "registry_pull.py"), "inspect", "--home",
                                       self.home, *argv, ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(proc.stdout, want)  # exactly: no newline added
        code, out, err = self.main("--home", self.home, "--inspect", "--raw", ref)  # the old spelling
        self.assertEqual((code, out.encode()), (0, served), err)
        self.assertFalse(os.path.exists(os.path.join(self.home, "blobs")))  # nothing stored
        self.assertEqual(len(reg.requests("GET", "blobs")), 1)  # the config only, no layer
        self.assertEqual(index, sha256(served))


    def test_raw_to_a_terminal_escapes_control_characters(self):
        """--raw to a terminal: a C1 control (valid JSON, and CSI to many terminals) is shown
        escaped, with a warning; through a pipe the bytes stay exact."""
        import pty
        reg = self.registry()
        img = Image()
        doc = json.loads(img.manifest)
        doc["annotations"] = {"note": "\u009b31mred\u009b0m"}
        img.manifest = json.dumps(doc, ensure_ascii=False).encode("utf-8")
        img.digest = sha256(img.manifest)
        reg.push("raw/tty", "v1", img)
        ref = reg.host + "/raw/tty:v1"
        argv = [sys.executable, os.path.join(HERE, "registry_pull.py"), "inspect", "--home", self.home, "--raw", ref]
        piped = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((piped.returncode, piped.stdout), (0, img.manifest), piped.stderr)
        leader, follower = pty.openpty()
        try:
            proc = subprocess.Popen(argv, stdout=follower, stderr=subprocess.PIPE)
            os.close(follower)
            follower = -1
            shown = read_terminal(leader)
            err = proc.communicate(timeout=60)[1]
        finally:
            os.close(leader)
            if follower != -1:
                os.close(follower)
        self.assertEqual(proc.returncode, 0, err)
        self.assertNotIn("\u009b".encode("utf-8"), shown)
        self.assertIn(b"\\x9b31mred", shown)
        self.assertIn(b"control characters escaped", err)


class ReferrersTests(Base):
    def subject_with_referrers(self, reg, n=3):
        img = reg.push("ref/app", "v1", Image())
        subject = {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest)}
        arts = [push_artifact(reg, "ref/app", None, Artifact({"sbom-%d.json" % i: b"{}%d" % i}, subject=subject,
                                                              artifact_type="application/spdx+json" if i % 2 else
                                                              "application/vnd.example.note"))
                for i in range(n)]
        return img, arts

    def test_the_api_every_page_and_the_filter(self):
        reg = self.registry()
        img, arts = self.subject_with_referrers(reg, 5)
        served = referrers_api(reg, page_size=2)
        found = rp.referrers(reg.host + "/ref/app@" + img.digest)
        self.assertEqual(sorted(d.digest for d in found), sorted(a.digest for a in arts))
        self.assertEqual(len(served), 3)  # 2 + 2 + 1
        spdx = rp.referrers(reg.host + "/ref/app:v1", artifact_type="application/spdx+json")
        self.assertEqual(sorted(d.digest for d in spdx), sorted(a.digest for a in arts[1::2]))
        referrers_api(reg, ignore_filter=True)  # a registry that ignores the filter: filtered here
        spdx = rp.referrers(reg.host + "/ref/app:v1", artifact_type="application/spdx+json")
        self.assertEqual(sorted(d.digest for d in spdx), sorted(a.digest for a in arts[1::2]))

    def test_without_the_api_the_tag_schema_and_cosign_tags(self):
        reg = self.registry()
        img, arts = self.subject_with_referrers(reg, 2)
        tag = img.digest.replace(":", "-")
        index = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX,
                            "manifests": [a.descriptor() for a in arts]}).encode()
        reg.manifests[("ref/app", tag)] = (rp.MT_OCI_INDEX, index)
        keys = Keys(self)
        key, _ = keys.pair()
        sig_digest, _ = keys.cosign(reg, "ref/app", img.digest, key, reg.host + "/ref/app")
        found = rp.referrers(reg.host + "/ref/app@" + img.digest)
        self.assertEqual(sorted(d.digest for d in found), sorted([a.digest for a in arts] + [sig_digest]))
        sig = next(d for d in found if d.digest == sig_digest)
        self.assertEqual(sig.annotations[rp._REF_NAME], tag + ".sig")
        code, out, err = self.main("inspect", "--json", "--home", self.home, reg.host + "/ref/app:v1")
        self.assertEqual(code, 0, err)
        listed = json.loads(out)["Referrers"]
        self.assertEqual(sorted(r["Digest"] for r in listed), sorted(d.digest for d in found))
        self.assertEqual([r["Tag"] for r in listed if "Tag" in r], [tag + ".sig"])

    def test_pull_referrers_into_the_store_and_the_layout(self):
        reg = self.registry()
        img, arts = self.subject_with_referrers(reg, 2)
        referrers_api(reg)
        keys = Keys(self)
        key, _ = keys.pair()
        sig_digest, _ = keys.cosign(reg, "ref/app", img.digest, key, reg.host + "/ref/app")
        layout = os.path.join(self.home, "layout")
        code, out, err = self.main(*self.cli_args("--referrers", "--oci-layout", layout, reg.host + "/ref/app:v1"))
        self.assertEqual(code, 0, err)
        with open(os.path.join(layout, "index.json")) as f:
            entries = json.load(f)["manifests"]
        by_digest = dict((e["digest"], e) for e in entries)
        for a in arts:
            self.assertEqual(by_digest[a.digest]["artifactType"], a.artifact_type)
            self.assertTrue(os.path.exists(os.path.join(layout, "blobs", "sha256", a.digest.split(":")[1])))
        tag = img.digest.replace(":", "-") + ".sig"
        self.assertEqual(by_digest[sig_digest]["annotations"][rp._REF_NAME], tag)
        # They belong to the image: gc keeps them; rm and gc remove them.
        self.assertEqual(self.main("gc", "--home", self.home)[0], 0)
        for a in arts:
            self.assertTrue(os.path.exists(os.path.join(self.home, "blobs", "sha256", a.digest.split(":")[1])))
        self.assertEqual(self.main("rm", "--home", self.home, reg.host + "/ref/app:v1")[0], 0)
        self.assertEqual(self.main("gc", "--home", self.home)[0], 0)
        self.assertEqual(os.listdir(os.path.join(self.home, "blobs", "sha256")), [])


# --------------------------------------------------------------------------- store and schema


class StoreRecoveryTests(Base):
    """What earlier runs, other processes or other users left in HOME."""

    def test_complete_partial_is_verified_without_a_request(self):
        reg = self.registry()
        img = reg.push("done/app", "v1", Image())
        layer = img.layers[1]
        digest = sha256(layer)
        final = self.blob_path(digest)
        os.makedirs(os.path.dirname(final))
        with open(final + ".partial", "wb") as f:
            f.write(layer)  # killed after the last byte, before the rename
        self.pull(reg, "done/app:v1")
        self.assertStoreHas(img)
        self.assertEqual([(m, p) for m, p in reg.requests() if p.endswith(digest)], [])
        self.assertFalse(os.path.exists(final + ".partial"))

    def test_planted_partial_symlink_never_writes_through(self):
        reg = self.registry()
        img = reg.push("link/app", "v1", Image())
        layer = img.layers[1]
        final = self.blob_path(sha256(layer))
        elsewhere = tempfile.mkdtemp(prefix="rp-victim-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        victim = os.path.join(elsewhere, "victim")
        with open(victim, "wb") as f:
            f.write(b"victim")
        before = os.stat(victim)
        os.makedirs(os.path.dirname(final))
        os.symlink(victim, final + ".partial")
        code, out, err = self.main(*self.cli_args(reg.host + "/link/app:v1"))
        with open(victim, "rb") as f:
            self.assertEqual(f.read(), b"victim")
        after = os.stat(victim)
        self.assertEqual((after.st_size, after.st_mtime_ns), (before.st_size, before.st_mtime_ns))
        if code == 0:
            st = os.lstat(final)
            self.assertTrue(stat.S_ISREG(st.st_mode), "the final blob is not a regular file")
            with open(final, "rb") as f:
                self.assertEqual(f.read(), layer)
        else:
            self.assertEqual(code, 7, err)
            self.assertOneErrorLine(err)
            self.assertIn(".partial", err)

    def test_files_follow_the_umask(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        reg = self.registry()
        img = Image()
        index_digest = reg.push_index("mode/app", "v1", [img], attestations=False)
        layout = os.path.join(self.home, "layout")
        archive = os.path.join(self.home, "image.tar")
        self.pull(reg, "mode/app:v1", oci_layout=layout, docker_archive=archive)
        paths = [os.path.join(self.home, "index.json"), os.path.join(self.home, "oci-layout"),
                 self.blob_path(index_digest), self.blob_path(img.digest), self.blob_path(sha256(img.config)),
                 self.blob_path(sha256(img.layers[0])), os.path.join(layout, "index.json"),
                 os.path.join(layout, "oci-layout"), archive]
        for path in paths:
            with self.subTest(case=os.path.relpath(path, self.home)):
                self.assertEqual(oct(stat.S_IMODE(os.stat(path).st_mode)), oct(0o644))

    def test_waiting_for_another_process_is_said_with_its_pid(self):
        reg = self.registry()
        img = reg.push("lock/app", "v1", Image())
        final = self.blob_path(sha256(img.layers[1]))
        os.makedirs(os.path.dirname(final))
        holder = subprocess.Popen(
            [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, "
             "0o644); fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)",
             final + ".partial"], stdout=subprocess.PIPE)
        self.addCleanup(end_process, holder)
        self.assertEqual(holder.stdout.readline().strip(), b"locked")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "registry_pull.py"), "-v",
                                 *self.cli_args(reg.host + "/lock/app:v1")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(end_process, proc)
        lines = []
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, b"")), daemon=True)
        reader.start()
        said = lambda: [ln for ln in lines if b"waiting for another registry_pull" in ln]  # noqa: E731
        self.assertTrue(wait_for(said, timeout=3.5), b"".join(lines))
        self.assertIn(str(holder.pid).encode(), said()[0])
        self.assertEqual(proc.poll(), None)  # still waiting, not failed
        holder.kill()
        holder.wait()
        self.assertEqual(proc.wait(timeout=20), 0, b"".join(lines))
        self.assertStoreHas(img)

    def test_short_final_blob_is_fetched_again(self):
        reg = self.registry()
        img = reg.push("short/app", "v1", Image())
        layer = img.layers[1]
        final = self.blob_path(sha256(layer))
        os.makedirs(os.path.dirname(final))
        with open(final, "wb") as f:
            f.write(layer[:len(layer) // 2])  # renamed before its data reached the disk, then the power went
        code, out, err = self.main(*self.cli_args(reg.host + "/short/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        self.assertFalse(os.path.exists(final + ".partial"))

    def test_a_planted_final_blob_link_is_refused(self):
        reg = self.registry()
        img = reg.push("plant/app", "v1", Image())
        victim_dir = tempfile.mkdtemp(prefix="rp-victim-")
        self.addCleanup(shutil.rmtree, victim_dir, True)
        victim = os.path.join(victim_dir, "victim")
        with open(victim, "wb") as f:
            f.write(img.layers[0])
        blobs = os.path.join(self.home, "blobs", "sha256")
        os.makedirs(blobs)
        os.symlink(victim, os.path.join(blobs, sha256(img.layers[0]).split(":")[1]))
        code, out, err = self.main(*self.cli_args(reg.host + "/plant/app:v1"))
        self.assertEqual(code, 7, err)
        self.assertIn("not a regular file", err)


OLD_SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    reference TEXT NOT NULL UNIQUE,
    size_bytes INTEGER NOT NULL,
    last_used_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    created_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    modified_at DATETIME DEFAULT CURRENT_TIMESTAMP,
    manifest_digest TEXT,
    index_digest TEXT,
    platform TEXT
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
    digest TEXT
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
    UNIQUE(manifest_id, layer_id)
);
CREATE INDEX IF NOT EXISTS idx_indexes_image_id ON indexes(image_id);
CREATE INDEX IF NOT EXISTS idx_manifests_image_id ON manifests(image_id);
CREATE INDEX IF NOT EXISTS idx_configs_manifest_id ON configs(manifest_id);
CREATE INDEX IF NOT EXISTS idx_manifest_layers_manifest_id ON manifest_layers(manifest_id);
"""


@unittest.skipIf(sqlite3 is None, "this Python has no sqlite3 module")
class DatabaseSchemaTests(Base):
    """Schema 2 (an image per reference and platform; a layer listed twice is two rows)."""

    def db(self):
        conn = sqlite3.connect(os.path.join(self.home, "oci.db"))
        self.addCleanup(conn.close)
        return conn

    def test_layer_listed_twice_is_two_rows(self):
        reg = self.registry()
        layer = make_layer({"same": os.urandom(5000)})
        img = reg.push("twice/app", "v1", Image(layers=[layer, layer]))
        self.pull(reg, "twice/app:v1")
        rows = self.db().execute(
            "SELECT ml.position, l.digest FROM manifest_layers ml JOIN manifests m ON m.id = ml.manifest_id "
            "JOIN layers l ON l.id = ml.layer_id WHERE m.digest = ? ORDER BY ml.position", (img.digest,)).fetchall()
        self.assertEqual(rows, [(0, sha256(layer[0])), (1, sha256(layer[0]))])

    def test_one_tag_two_platforms_is_two_images(self):
        reg = self.registry()
        amd, arm = Image("amd64"), Image("arm64", "v8")
        reg.push_index("two/app", "v1", [amd, arm])
        self.pull(reg, "two/app:v1", platform="linux/amd64")
        res = self.pull(reg, "two/app:v1", platform="linux/arm64")
        self.pull(reg, "two/app:v1", platform="linux/amd64")  # again: replaced, not added
        rows = self.db().execute("SELECT manifest_digest, platform FROM images WHERE reference = ?",
                                 (res.reference,)).fetchall()
        self.assertEqual(sorted(rows), sorted([(amd.digest, "linux/amd64"), (arm.digest, "linux/arm64/v8")]))
        with open(os.path.join(self.home, "index.json")) as f:
            entries = [m for m in json.load(f)["manifests"]
                       if m["annotations"]["org.opencontainers.image.ref.name"] == res.reference]
        self.assertEqual(sorted(m["digest"] for m in entries), sorted([amd.digest, arm.digest]))

    def test_version_1_store_is_upgraded_in_place(self):
        now = "2025-01-01 00:00:00"
        old_ref = "old.example/app:v1"
        conn = sqlite3.connect(os.path.join(self.home, "oci.db"), isolation_level=None)
        conn.executescript(OLD_SCHEMA_V1)
        conn.execute("PRAGMA user_version = 1")
        image_id = conn.execute(
            "INSERT INTO images (reference, size_bytes, last_used_at, created_at, modified_at, manifest_digest,"
            " index_digest, platform) VALUES (?,?,?,?,?,?,?,?)",
            (old_ref, 123, now, now, now, sha256(b"old manifest"), sha256(b"old index"), "linux/amd64")).lastrowid
        index_id = conn.execute(
            "INSERT INTO indexes (image_id, schema_version, media_type, platform_os, platform_arch, digest)"
            " VALUES (?,?,?,?,?,?)", (image_id, 2, rp.MT_OCI_INDEX, "linux", "amd64", sha256(b"old index"))).lastrowid
        manifest_id = conn.execute(
            "INSERT INTO manifests (index_id, image_id, schema_version, media_type, digest) VALUES (?,?,?,?,?)",
            (index_id, image_id, 2, rp.MT_OCI_MANIFEST, sha256(b"old manifest"))).lastrowid
        conn.execute("INSERT INTO configs (manifest_id, media_type, architecture, os, digest) VALUES (?,?,?,?,?)",
                     (manifest_id, rp.MT_OCI_CONFIG, "amd64", "linux", sha256(b"old config")))
        for pos, name in enumerate((b"old layer 0", b"old layer 1")):
            layer_id = conn.execute("INSERT INTO layers (media_type, digest, size_bytes) VALUES (?,?,?)",
                                    (OCI["layer"], sha256(name), 10)).lastrowid
            conn.execute("INSERT INTO manifest_layers (manifest_id, layer_id, position) VALUES (?,?,?)",
                         (manifest_id, layer_id, pos))
        conn.close()
        reg = self.registry()
        amd, arm = Image("amd64"), Image("arm64", "v8")
        reg.push_index("new/app", "v1", [amd, arm])
        self.pull(reg, "new/app:v1", platform="linux/amd64")
        res = self.pull(reg, "new/app:v1", platform="linux/arm64")
        conn = self.db()
        self.assertEqual(conn.execute("PRAGMA user_version").fetchone()[0], rp._SCHEMA_VERSION)
        images = conn.execute("SELECT reference, platform FROM images ORDER BY id").fetchall()
        self.assertEqual(images, [(old_ref, "linux/amd64"), (res.reference, "linux/amd64"),
                                  (res.reference, "linux/arm64/v8")])
        counts = [conn.execute(q, (sha256(b"old manifest"),)).fetchone()[0] for q in (
            "SELECT COUNT(*) FROM manifests WHERE digest = ?",
            "SELECT COUNT(*) FROM indexes i JOIN manifests m ON m.index_id = i.id WHERE m.digest = ?",
            "SELECT COUNT(*) FROM configs c JOIN manifests m ON m.id = c.manifest_id WHERE m.digest = ?",
            "SELECT COUNT(*) FROM manifest_layers ml JOIN manifests m ON m.id = ml.manifest_id WHERE m.digest = ?")]
        self.assertEqual(counts, [1, 1, 1, 2])  # the old image's rows survived the rebuild (no cascade)
        self.assertEqual(conn.execute("PRAGMA foreign_key_check").fetchall(), [])
        self.assertEqual(conn.execute("PRAGMA integrity_check").fetchone()[0], "ok")


class StoreCareTests(Base):
    def test_index_json_changes_by_the_line_and_says_what_a_rebuild_would(self):
        """Pulls, a tag moved, a second platform and rm each change only their name's lines of
        index.json: after each, the file is byte for byte what rebuilding it from the database
        gives; a file not in that form (indented by hand) is rebuilt whole."""
        reg = self.registry()
        index = os.path.join(self.home, "index.json")

        def check():
            with open(index, "rb") as f:
                have = f.read()
            rp._Store(self.home).write_index()  # from scratch
            with open(index, "rb") as f:
                self.assertEqual(have, f.read())
            return json.loads(have)
        made = []
        real = rp._Store._index_line
        self.addCleanup(setattr, rp._Store, "_index_line", real)
        rp._Store._index_line = lambda store, *a: made.append(a[2]) or real(store, *a)
        for name in ["idx/m", "idx/a", "idx/z", "idx/a-b", "idx/ete"]:
            reg.push(name, "v1", Image())
            del made[:]
            self.pull(reg, name + ":v1")
            self.assertEqual(made, [reg.host + "/" + name + ":v1"])  # its own line only, not every image's
            check()
        reg.push("idx/a", "v1", Image(env=["MOVED=1"]))  # the tag moves
        self.pull(reg, "idx/a:v1")
        check()
        reg.push_index("idx/multi", "v1", [Image("amd64"), Image("arm64", "v8")])
        self.pull(reg, "idx/multi:v1", platform="linux/arm64")
        self.pull(reg, "idx/multi:v1", platform="linux/amd64")
        doc = check()
        self.assertEqual(len([m for m in doc["manifests"]
                              if m["annotations"]["org.opencontainers.image.ref.name"].endswith("idx/multi:v1")]), 2)
        rp.remove(reg.host + "/idx/z:v1", home=self.home)
        doc = check()
        refs = [m["annotations"]["org.opencontainers.image.ref.name"] for m in doc["manifests"]]
        self.assertEqual(refs, sorted(refs))
        self.assertNotIn(reg.host + "/idx/z:v1", refs)
        with open(index, "w") as f:  # by hand, indented: still read as an index, rebuilt whole
            json.dump(doc, f, indent=4)
        reg.push("idx/new", "v1", Image())
        self.pull(reg, "idx/new:v1")
        self.assertEqual(len(check()["manifests"]), len(refs) + 1)

    def test_index_json_splice_matches_a_sorted_list(self):
        """The byte-offset binary search puts a name's lines where a sorted list of lines puts
        them, replacing the old ones, for names before, between, after and among the others."""
        store = rp._Store(self.home)
        head = store._ENTRY_HEAD

        def line(name, n=0):
            return (head + json.dumps(name) + '},"digest":"sha256:%064x","size":%d}' % (n, n)).encode()
        rng = random.Random(3)
        for trial in range(300):
            names = sorted(set(rng.choice("abcdefgh") * rng.randint(1, 3) for _ in range(rng.randint(1, 12))))
            lines = [line(n, i) for n in names for i in range(rng.randint(1, 2))]
            ref = rng.choice("abcdefghi") * rng.randint(1, 3)
            new = [line(ref, 90 + i) for i in range(rng.randint(0, 2))]
            want = sorted([x for x in lines if store._line_name(x) != ref] + new, key=store._line_name)
            got = b",\n".join(store._splice(b",\n".join(lines), ref, new))
            self.assertEqual(got, b",\n".join(want), (names, ref))

    def test_layer_rows_go_with_the_last_image_using_them(self):
        """rm, a tag moved to another image, and gc (for rows an older version left) delete the
        layers rows nothing uses any more; a layer still shared stays."""
        reg = self.registry()
        shared = make_layer({"base": b"shared"})
        a = reg.push("rows/a", "v1", Image(layers=[shared, make_layer({"a": b"a1"})]))
        b = reg.push("rows/b", "v1", Image(layers=[shared, make_layer({"b": b"b1"})]))
        self.pull(reg, "rows/a:v1")
        self.pull(reg, "rows/b:v1")
        db = sqlite3.connect(os.path.join(self.home, "oci.db"))
        self.addCleanup(db.close)
        layers = lambda: sorted(r[0] for r in db.execute("SELECT digest FROM layers"))  # noqa: E731
        self.assertEqual(layers(), sorted(set(sha256(x) for x in a.layers + b.layers)))
        rp.remove(reg.host + "/rows/a:v1", home=self.home)
        self.assertEqual(layers(), sorted(sha256(x) for x in b.layers))
        c = reg.push("rows/b", "v1", Image(layers=[shared, make_layer({"c": b"c1"})]))  # the tag moves
        self.pull(reg, "rows/b:v1")
        self.assertEqual(layers(), sorted(sha256(x) for x in c.layers))
        db.execute("INSERT INTO layers (media_type, digest, size_bytes) VALUES ('x', 'sha256:%064x', 1)" % 5)
        db.commit()
        rp.collect_garbage(home=self.home)
        self.assertEqual(layers(), sorted(sha256(x) for x in c.layers))

    def test_a_warm_re_pull_rewrites_nothing_but_its_last_used_time(self):
        """Nothing changed: index.json is not rewritten (same inode), the host row not written again;
        a corrupt manifest removed by verify and fetched again does rewrite it (listed again)."""
        reg = self.registry()
        img = reg.push("warm/app", "v1", Image())
        self.pull(reg, "warm/app:v1")
        index = os.path.join(self.home, "index.json")
        before = os.stat(index)
        db = sqlite3.connect(os.path.join(self.home, "oci.db"))
        self.addCleanup(db.close)
        hosts = db.execute("SELECT modified_at FROM hosts").fetchall()
        used = db.execute("SELECT last_used_at FROM images").fetchall()
        time.sleep(1.1)  # the times are to the second
        self.pull(reg, "warm/app:v1")
        self.assertEqual(os.stat(index).st_ino, before.st_ino)
        self.assertEqual(db.execute("SELECT modified_at FROM hosts").fetchall(), hosts)
        self.assertNotEqual(db.execute("SELECT last_used_at FROM images").fetchall(), used)
        with open(os.path.join(self.home, "blobs", "sha256", img.digest.split(":")[1]), "wb") as f:
            f.write(b"{}")
        rp.verify(home=self.home)  # removes it, and leaves the image out of index.json
        with open(index) as f:
            self.assertNotIn(img.digest, f.read())
        self.pull(reg, "warm/app:v1")
        with open(index) as f:
            self.assertIn(img.digest, f.read())

    def test_images_remove_gc(self):
        reg = self.registry()
        a, b = reg.push("care/a", "v1", Image()), reg.push("care/b", "v1", Image())
        self.pull(reg, "care/a:v1")
        self.pull(reg, "care/b:v1")
        code, out, err = self.main("--home", self.home, "--images", "--json")
        self.assertEqual(code, 0, err)
        rows = json.loads(out)
        self.assertEqual([r["reference"] for r in rows], [reg.host + "/care/a:v1", reg.host + "/care/b:v1"])
        self.assertEqual(rows[0]["manifest_digest"], a.digest)
        self.assertEqual(rows[0]["platform"], "linux/amd64")
        self.assertEqual(rows[0]["size"], a.size)
        blobs = os.path.join(self.home, "blobs", "sha256")
        stray = os.path.join(blobs, "%064x" % 7)
        with open(stray, "wb") as f:
            f.write(b"unreferenced")
        old, fresh = os.path.join(blobs, "%064x.partial" % 8), os.path.join(blobs, "%064x.partial" % 9)
        for path in (old, fresh):
            with open(path, "wb") as f:
                f.write(b"part")
        os.utime(old, (time.time() - 2 * 86400,) * 2)
        code, out, err = self.main("--home", self.home, "--remove", reg.host + "/care/a:v1")
        self.assertEqual(code, 0, err)
        self.assertEqual([r[0] for r in self.image_rows()], [reg.host + "/care/b:v1"])
        with open(os.path.join(self.home, "index.json")) as f:
            self.assertNotIn("care/a", f.read())
        self.assertStoreHas(a)  # blobs stay until collected
        code, out, err = self.main("--home", self.home, "--remove", reg.host + "/care/a:v1")
        self.assertEqual(code, 4, err)
        code, out, err = self.main("--home", self.home, "--gc", "--json")
        self.assertEqual(code, 0, err)
        freed = json.loads(out)
        self.assertEqual(freed["deleted"], 4 + 2)  # a's manifest, config, 2 layers; the stray blob; the old .partial
        self.assertFalse(os.path.exists(stray) or os.path.exists(old))
        self.assertTrue(os.path.exists(fresh))  # young: perhaps a pull that comes back
        self.assertStoreHas(b)
        self.assertFalse(os.path.exists(os.path.join(blobs, a.digest.split(":")[1])))
        code, out, err = self.main("--home", self.home, "--gc", "--json")
        self.assertEqual(json.loads(out), {"deleted": 0, "freed_bytes": 0})

    def test_reference_walk_reads_each_index_once(self):
        # --gc and --verify start from this walk: an index shared by many tags must be read
        # once, not once per image and layer (issue 20's quadratic corner).
        reg = self.registry()
        amd, arm = Image("amd64"), Image("arm64")
        index = reg.push_index("walk/app", "t0", [amd, arm], attestations=False)
        for tag in ("t1", "t2"):
            reg.manifests[("walk/app", tag)] = reg.manifests[("walk/app", "t0")]
        refs = [reg.host + "/walk/app:t%d" % i for i in range(3)]
        for ref in refs:
            rp.pull(ref, home=self.home, platform="linux/amd64")
        store = rp._Store(self.home)
        reads = []
        real = store.read
        store.read = lambda digest: reads.append(digest) or real(digest)
        users = store.referenced()
        self.assertEqual(sorted(reads), sorted([index, amd.digest, arm.digest]))
        for digest in [index, amd.digest] + list(amd.blobs()):
            self.assertEqual(users[digest], refs, digest)

    def test_gc_racing_a_pull_never_takes_its_blobs(self):
        reg = self.registry()
        img = reg.push("race/app", "v1", Image(layers=[make_layer({"f%d" % i: os.urandom(300000)}) for i in range(3)]))
        for layer in img.layers:
            reg.fault = slow_blob(reg, sha256(layer), chunk=32768, delay=0.01)
        result = {}

        def pull():
            try:
                result["res"] = self.pull(reg, "race/app:v1", jobs=1)
            except BaseException as e:  # looked at below
                result["err"] = e
        t = threading.Thread(target=pull)
        t.start()
        blobs = os.path.join(self.home, "blobs", "sha256")
        self.assertTrue(wait_for(lambda: os.path.isdir(blobs) and any(n.endswith(".partial")
                                                                      for n in os.listdir(blobs))))
        collected = []
        while t.is_alive() or not collected:
            collected.append(rp.collect_garbage(home=self.home, partial_age=0))
        t.join()
        self.assertNotIn("err", result)
        self.assertStoreHas(img)
        self.assertEqual(rp.collect_garbage(home=self.home, partial_age=0), (0, 0))

    def test_verify_names_the_image_a_corrupt_blob_breaks(self):
        reg = self.registry()
        img = reg.push("ver/app", "v1", Image())
        self.pull(reg, "ver/app:v1")
        code, out, err = self.main("--home", self.home, "--verify")
        self.assertEqual(code, 0, err)
        path = os.path.join(self.home, "blobs", "sha256", sha256(img.layers[1]).split(":")[1])
        with open(path, "r+b") as f:
            f.write(b"X")
        code, out, err = self.main("--home", self.home, "--verify")
        self.assertEqual(code, 5, out + err)
        self.assertIn(sha256(img.layers[1]), out)
        self.assertIn(reg.host + "/ver/app:v1", out)
        self.assertFalse(os.path.exists(path))
        self.pull(reg, "ver/app:v1")  # fetched again
        self.assertStoreHas(img)

    def test_actions_and_references_do_not_clash(self):
        reg = self.registry()
        reg.push("inspect", "latest", Image())  # an image named like an action is pulled
        code, out, err = self.main(*self.cli_args(reg.host + "/inspect"))
        self.assertEqual(code, 0, err)
        code, out, err = self.main("--home", self.home, "--images", reg.host + "/inspect")
        self.assertEqual(code, 2, err)
        code, out, err = self.main("--home", self.home, "--inspect")
        self.assertEqual(code, 2, err)


class StoreLinkTests(Base):
    """verify and gc meeting symlinks in HOME/blobs."""

    def test_a_fifo_or_directory_under_a_digest_never_hangs(self):
        """A FIFO (or a directory) planted under a stored manifest's name: pull, verify and gc end, saying so."""
        reg = self.registry()
        img = reg.push("fifo/app", "v1", Image())
        ref = reg.host + "/fifo/app:v1"
        self.assertEqual(self.main(*self.cli_args(ref))[0], 0)
        path = os.path.join(self.home, "blobs", "sha256", img.digest.split(":")[1])
        for kind in ("fifo", "dir"):
            with self.subTest(kind=kind):
                if os.path.isdir(path):
                    os.rmdir(path)
                elif os.path.lexists(path):
                    os.unlink(path)
                os.mkfifo(path) if kind == "fifo" else os.mkdir(path)
                for argv in (self.cli_args("--timeout", "10", ref), ["verify", "--home", self.home],
                             ["gc", "--home", self.home]):
                    proc = subprocess.run([sys.executable, os.path.join(HERE, "registry_pull.py"), *argv],
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
                    self.assertNotIn(b"internal error", proc.stderr)
                    self.assertIn(proc.returncode, (0, 5, 7), proc.stderr)

    def test_verify_reports_a_digest_named_symlink_as_corrupt_and_goes_on(self):
        """verify treats a digest-named symlink as corrupt, still reports the real corrupt blob, exits 5, never
        touches the link's target."""
        reg = self.registry()
        img = reg.push("ver/app", "v1", Image())
        self.pull(reg, "ver/app:v1")
        corrupt = sha256(img.layers[1])
        with open(self.blob_path(corrupt), "r+b") as f:
            f.write(b"X")
        victim = os.path.join(victim_dir(self), "passwd")
        before = host_state(os.path.dirname(victim))
        planted = "sha256:" + "0" * 64  # sorts first: met before the corrupt blob
        os.symlink(victim, self.blob_path(planted))
        code, out, err = self.main("--home", self.home, "verify")
        self.assertEqual(code, 5, "exit %d: %s" % (code, (out + err).strip()))
        self.assertIn(planted, out)
        self.assertIn(corrupt, out)
        self.assertEqual(host_state(os.path.dirname(victim)), before)

    def test_gc_never_deletes_through_a_symlinked_blob_directory(self):
        """With HOME/blobs/sha256 a symlink to another directory, gc leaves that directory's 64-hex files alone."""
        elsewhere = tempfile.mkdtemp(prefix="rp-elsewhere-")
        self.addCleanup(shutil.rmtree, elsewhere, True)
        files = {}
        for i in (7, 8):
            path = os.path.join(elsewhere, "%064x" % i)
            with open(path, "wb") as f:
                f.write(b"someone else's file %d\n" % i)
            files[path] = b"someone else's file %d\n" % i
        os.makedirs(os.path.join(self.home, "blobs"))
        os.symlink(elsewhere, os.path.join(self.home, "blobs", "sha256"))
        code, out, err = self.main("--home", self.home, "gc")
        for path, data in files.items():
            self.assertTrue(os.path.exists(path), "gc (exit %d) deleted %s through HOME/blobs/sha256 -> %s: %s"
                            % (code, os.path.basename(path), elsewhere, (out + err).strip()))
            with open(path, "rb") as f:
                self.assertEqual(f.read(), data)
        self.assertIn(code, (0, 7), err)
        self.assertNotIn("internal error", err)


class OfflineTests(Base):
    """--offline: the store alone answers, and nothing is sent."""

    def test_offline_outputs_from_the_store_when_the_registry_is_gone(self):
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8")]
        reg.push_index("off/app", "v1", images)
        ref = reg.host + "/off/app:v1"
        online = os.path.join(self.home, "online")
        self.assertEqual(self.main(*self.cli_args("--rootfs", online, ref))[0], 0)
        reg.server.shutdown()
        reg.server.server_close()
        # Gone: the error says the store could serve it.
        code, out, err = self.main(*self.cli_args("--timeout", "5", ref))
        self.assertEqual(code, 6, err)
        self.assertIn("--offline", err)
        before = len(reg.log)
        offline, layout = os.path.join(self.home, "offline"), os.path.join(self.home, "layout")
        archive = os.path.join(self.home, "img.tar")
        code, out, err = self.main(*self.cli_args("--offline", "--rootfs", offline, "--oci-layout", layout,
                                                  "--docker-archive", archive, ref))
        self.assertEqual(code, 0, err)
        self.assertEqual(untimed_dirs(tree(offline)), untimed_dirs(tree(online)))
        self.assertTrue(os.path.getsize(archive) > 0)
        with open(os.path.join(layout, "index.json")) as f:
            self.assertEqual(json.load(f)["manifests"][0]["digest"], images[0].digest)
        self.assertEqual(len(reg.log), before)  # nothing sent
        # What the store lacks is not found, and says so.
        code, out, err = self.main("--home", self.home, "--platform", "linux/arm64", "--offline", ref)
        self.assertEqual(code, 4, err)
        self.assertIn("not in the store", err)
        code, out, err = self.main(*self.cli_args("--offline", reg.host + "/off/other:v1"))
        self.assertEqual(code, 4, err)
        self.assertIn("not in the store", err)


class LocalSourceTests(Base):
    """oci:DIR[:NAME] as a source: a layout carried across an air gap, read back and verified."""

    def test_a_layout_written_here_is_a_source(self):
        reg = self.registry()
        img = reg.push("src/app", "v1", Image())
        layout = os.path.join(self.home, "carried")
        online = os.path.join(self.home, "online")
        self.assertEqual(self.main(*self.cli_args("--oci-layout", layout + ":app", "--rootfs", online,
                                                  reg.host + "/src/app:v1"))[0], 0)
        other = os.path.join(self.home, "other-store")
        root = os.path.join(self.home, "from-layout")
        code, out, err = self.main("--home", other, "--json", "--rootfs", root, "oci:%s:app" % layout)
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["manifest_digest"], img.digest)
        self.assertEqual(doc["reference"], "oci:%s:app" % layout)
        self.assertEqual(untimed_dirs(tree(root)), untimed_dirs(tree(online)))
        code, out, err = self.main("inspect", "--json", "oci:%s:app" % layout)
        self.assertEqual((code, json.loads(out)["Digest"]), (0, img.digest), err)
        code, out, err = self.main("--home", other, "oci:%s:nope" % layout)
        self.assertEqual(code, 4, err)

    def test_a_layout_is_untrusted_input(self):
        reg = self.registry()
        img = reg.push("src/app", "v1", Image())
        layout = os.path.join(self.home, "carried")
        self.assertEqual(self.main(*self.cli_args("--oci-layout", layout + ":app", reg.host + "/src/app:v1"))[0], 0)
        blob = os.path.join(layout, "blobs", "sha256", sha256(img.layers[1]).split(":")[1])
        os.unlink(blob)
        with open(blob, "wb") as f:
            f.write(b"x" * len(img.layers[1]))  # the right size, the wrong bytes
        code, out, err = self.main("--home", os.path.join(self.home, "s1"), "oci:%s:app" % layout)
        self.assertEqual(code, 5, err)
        os.unlink(blob)
        with open(blob, "wb") as f:
            f.write(img.layers[1][:-3])  # cut short: the layout's file is named, not a registry
        code, out, err = self.main("--home", os.path.join(self.home, "s3"), "oci:%s:app" % layout)
        self.assertEqual(code, 5, err)
        self.assertIn("its file in oci:%s has %d: refused" % (layout, len(img.layers[1]) - 3), err)
        self.assertNotIn("the registry sent", err)
        os.unlink(blob)
        os.symlink("/etc/passwd", blob)  # a link in blobs/: refused, never followed
        code, out, err = self.main("--home", os.path.join(self.home, "s2"), "oci:%s:app" % layout)
        self.assertEqual(code, 5, err)
        self.assertIn("refused", err)

    def test_several_images_need_a_name(self):
        reg = self.registry()
        reg.push("src/a", "v1", Image())
        reg.push("src/b", "v1", Image())
        layout = os.path.join(self.home, "two")
        for name in ("a", "b"):
            self.assertEqual(self.main(*self.cli_args("--oci-layout", "%s:%s" % (layout, name),
                                                      "%s/src/%s:v1" % (reg.host, name)))[0], 0)
        code, out, err = self.main("--home", os.path.join(self.home, "s"), "oci:" + layout)
        self.assertEqual(code, 2, err)
        self.assertIn("a, b", err)

    def test_every_output_works_from_a_local_source(self):
        """README: from oci: and docker-archive: sources every output works as for a registry pull."""
        reg = self.registry()
        img = reg.push("src/out", "v1", Image())
        layout = os.path.join(self.home, "carried")
        self.assertEqual(self.main(*self.cli_args("--oci-layout", layout + ":app", reg.host + "/src/out:v1"))[0], 0)
        for i, source in enumerate(("oci:%s:app" % layout, None)):
            if source is None:  # the archive written from the layout is the next source
                source = "docker-archive:" + os.path.join(self.home, "out0.tar")
            with self.subTest(source=source.split(":")[0]):
                out_layout, archive = os.path.join(self.home, "lay%d" % i), os.path.join(self.home, "out%d.tar" % i)
                code, _, err = self.main("--home", os.path.join(self.home, "s%d" % i), "--oci-layout", out_layout,
                                         "--docker-archive", archive, source)
                self.assertEqual(code, 0, err)
                with open(os.path.join(out_layout, "index.json")) as f:
                    entries = json.load(f)["manifests"]
                self.assertEqual([(e["digest"], e["annotations"][rp._REF_NAME]) for e in entries],
                                 [(img.digest, "app")] if i == 0 else [(entries[0]["digest"], "latest")])
                with tarfile.open(archive) as tar:
                    manifest = json.load(tar.extractfile("manifest.json"))
                self.assertEqual([m["RepoTags"] for m in manifest], [[]])  # no registry name to load it as
                code, _, err = self.main("--home", os.path.join(self.home, "s%d" % i), "copy", source,
                                         "oci:%s:copied" % out_layout)
                self.assertEqual(code, 0, err)

    def test_a_docker_archive_of_a_sparse_or_a_cut_member_is_refused(self):
        """A few KiB of archive must not become gigabytes of zeros in the store (a sparse member's
        holes), and a member cut short is an integrity error naming the archive, not a crash."""
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers",
                                                                               "diff_ids": ["sha256:" + "0" * 64]}})
        manifest = json.dumps([{"Config": "c.json", "RepoTags": ["img:v1"], "Layers": ["l.tar"]}]).encode()

        def member(name, data, size=None):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data) if size is None else size, 0o644
            return info.tobuf(tarfile.PAX_FORMAT) + data + b"\0" * (-len(data) % 512)
        head = member("manifest.json", manifest) + member("c.json", cfg.encode())
        sparse = tarfile.TarInfo("l.tar")
        sparse.mode, sparse.pax_headers = 0o644, {"GNU.sparse.map": "0,0", "GNU.sparse.size": str(1 << 30),
                                                  "GNU.sparse.numblocks": "1"}
        cases = {"sparse": (head + sparse.tobuf(tarfile.PAX_FORMAT) + b"\0" * 1024, "is a sparse member: refused"),
                 "cut": (head + member("l.tar", b"x" * 600, size=7 << 30), "is not a whole tar (truncated?)")}
        for what, (data, said) in cases.items():
            with self.subTest(archive=what):
                archive = os.path.join(self.home, what + ".tar")
                with open(archive, "wb") as f:
                    f.write(data)
                store = os.path.join(self.home, "store-" + what)
                code, _, err = self.main("--home", store, "docker-archive:" + archive)
                self.assertEqual(code, 5, err)
                self.assertIn("docker-archive:%s" % archive, err)
                self.assertIn(said, err)
                stored = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(store) for n in ns
                             if not n.startswith("oci.db"))
                self.assertLess(stored, 1 << 20)
        fifo = os.path.join(self.home, "fifo.tar")  # (a --from-file list can name one): no open that hangs
        os.mkfifo(fifo)
        code, _, err = self.main("--home", os.path.join(self.home, "store-fifo"), "docker-archive:" + fifo)
        self.assertEqual(code, 5, err)
        self.assertIn("it is not a regular file: refused", err)

    def test_a_docker_archive_gives_its_layers_to_parallel_downloads(self):
        # Six layers read at once from one archive: each must be read at its own offset (one
        # shared file position, sought and read by six threads, mixed their bytes).
        rng = random.Random(5)
        layers = [make_layer({"f%d" % i: rng.getrandbits(8 << 22).to_bytes(1 << 22, "little")}) for i in range(6)]
        reg = self.registry()
        reg.push("arc/many", "v1", Image(layers=layers))
        archive = os.path.join(self.home, "many.tar")
        res = self.pull(reg, "arc/many:v1", docker_archive=archive)
        for i in range(3):
            got = rp.pull("docker-archive:" + archive, home=os.path.join(self.home, "again%d" % i), jobs=6,
                          platform="linux/amd64")
            self.assertEqual([x.digest for x in got.layers], [x.digest for x in res.layers])

    def test_a_docker_archive_is_a_source(self):
        reg = self.registry()
        img = reg.push("arc/app", "v1", Image())
        archive, online = os.path.join(self.home, "app.tar"), os.path.join(self.home, "online")
        res = self.pull(reg, "arc/app:v1", docker_archive=archive, rootfs=online)
        other, root = os.path.join(self.home, "other"), os.path.join(self.home, "from-archive")
        code, out, err = self.main("--home", other, "--json", "--rootfs", root, "docker-archive:" + archive)
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["config_digest"], res.config.digest)  # the same image (its layers are stored as given)
        self.assertEqual(untimed_dirs(tree(root)), untimed_dirs(tree(online)))
        with tarfile.open(archive) as tar:
            tag = json.load(tar.extractfile("manifest.json"))[0]["RepoTags"][0]
        code, out, err = self.main("--home", other, "docker-archive:%s:%s" % (archive, tag))
        self.assertEqual(code, 0, err)
        code, out, err = self.main("--home", other, "docker-archive:%s:nosuch/image:v9" % archive)
        self.assertEqual(code, 4, err)

    def test_an_archive_link_out_of_it_is_refused(self):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tar:
            def add(name, data=b"", link=None):
                info = tarfile.TarInfo(name)
                if link:
                    info.type, info.linkname = tarfile.SYMTYPE, link
                else:
                    info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            config = json.dumps({"architecture": "amd64", "os": "linux",
                                 "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "0" * 64]}}).encode()
            add("c.json", config)
            add("l/layer.tar", link="../../../etc/passwd")
            add("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": ["x:y"],
                                              "Layers": ["l/layer.tar"]}]).encode())
        path = os.path.join(self.home, "evil.tar")
        with open(path, "wb") as f:
            f.write(raw.getvalue())
        code, out, err = self.main("--home", self.home, "docker-archive:" + path)
        self.assertEqual(code, 5, err)
        self.assertIn("links out of the archive", err)

    def test_a_skopeo_layout_gives_the_registry_pull_digests(self):
        if not REGISTRY_BIN or not SKOPEO:
            self.skipTest("docker-registry and skopeo are needed")
        dist = Distribution(self)
        img = Image()
        dist.push("sk/app", [img])
        layout = os.path.join(self.home, "skopeo-layout")
        proc = subprocess.run([SKOPEO, "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                               "docker://%s/sk/app:v1" % dist.host, "oci:%s:v1" % layout],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        from_registry = rp.pull(dist.host + "/sk/app:v1", home=os.path.join(self.home, "a"), platform="linux/amd64",
                                rootfs=os.path.join(self.home, "ra"))
        from_layout = rp.pull("oci:%s:v1" % layout, home=os.path.join(self.home, "b"), platform="linux/amd64",
                              rootfs=os.path.join(self.home, "rb"))
        self.assertEqual(from_layout.manifest_digest, from_registry.manifest_digest)
        self.assertEqual([x.digest for x in from_layout.layers], [x.digest for x in from_registry.layers])
        self.assertEqual(untimed_dirs(tree(os.path.join(self.home, "rb"))), untimed_dirs(tree(os.path.join(self.home, "ra"))))
        # A docker-archive skopeo writes (uncompressed layers): the same config and tree.
        archive = os.path.join(self.home, "skopeo.tar")
        proc = subprocess.run([SKOPEO, "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                               "docker://%s/sk/app:v1" % dist.host, "docker-archive:%s:sk/app:v1" % archive],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        from_archive = rp.pull("docker-archive:" + archive, home=os.path.join(self.home, "c"), platform="linux/amd64",
                               rootfs=os.path.join(self.home, "rc"))
        self.assertEqual(from_archive.config.digest, from_registry.config.digest)
        self.assertEqual(untimed_dirs(tree(os.path.join(self.home, "rc"))), untimed_dirs(tree(os.path.join(self.home, "ra"))))


# --------------------------------------------------------------------------- downloads and resume


class FaultTests(Base):
    def big_image(self):
        return Image(layers=[make_layer({"big": os.urandom(3 * 1024 * 1024)}), make_layer({"x": b"x"})])

    def test_connection_cut_mid_blob_resumes_with_range(self):
        reg = self.registry()
        img = reg.push("cut/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        cuts = []

        def cut(h, method, path):
            if path.endswith(big) and len(cuts) < 3:
                data = reg.blobs[big]
                start = int((h.headers.get("Range") or "bytes=0-")[6:-1])
                cuts.append(start)
                h.send_response(206 if start else 200)
                h.send_header("Content-Length", str(len(data) - start))
                if start:
                    h.send_header("Content-Range", "bytes %d-%d/%d" % (start, len(data) - 1, len(data)))
                h.end_headers()
                h.wfile.write(data[start:start + 1024 * 1024])  # a megabyte, then the line drops
                h.wfile.flush()
                h.close_connection = True
                return True
            return False
        reg.fault = cut
        res = self.pull(reg, "cut/app:v1")
        self.assertStoreHas(img)
        self.assertEqual(len(cuts), 3)
        self.assertEqual(cuts[0], 0)
        self.assertTrue(all(b > a for a, b in zip(cuts, cuts[1:])), cuts)
        self.assertLess(res.downloaded_bytes, 1.2 * img.size)

    def test_range_ignored_starts_over(self):
        reg = self.registry()
        img = reg.push("norange/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        # A .partial left by an earlier run: the first megabyte.
        partial = os.path.join(self.home, "blobs", "sha256", big.split(":")[1] + ".partial")
        os.makedirs(os.path.dirname(partial))
        with open(partial, "wb") as f:
            f.write(img.layers[0][:1024 * 1024])
        reg.honour_range = False
        res = self.pull(reg, "norange/app:v1")
        self.assertStoreHas(img)
        self.assertEqual(self.stray_files(), [])
        # It asked to resume; the server's 200 was taken as the whole blob, from byte 0.
        ranges = [hd.get("Range") for m, p, hd in reg.log if m == "GET" and p.endswith(big)]
        self.assertEqual(ranges, ["bytes=%d-" % (1024 * 1024)])
        self.assertEqual(res.downloaded_bytes, img.size)

    def test_resume_partial_with_range(self):
        reg = self.registry()
        img = reg.push("resume/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        partial = os.path.join(self.home, "blobs", "sha256", big.split(":")[1] + ".partial")
        os.makedirs(os.path.dirname(partial))
        with open(partial, "wb") as f:
            f.write(img.layers[0][:2 * 1024 * 1024])
        res = self.pull(reg, "resume/app:v1")
        self.assertStoreHas(img)
        log = [(m, p, hd) for m, p, hd in reg.log if p.endswith(big)]
        self.assertEqual(len(log), 1)
        self.assertEqual(log[0][2].get("Range"), "bytes=%d-" % (2 * 1024 * 1024))
        self.assertEqual(res.downloaded_bytes, img.size - 2 * 1024 * 1024)

    def test_bad_content_range_starts_over(self):
        reg = self.registry()
        img = reg.push("badcr/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        partial = os.path.join(self.home, "blobs", "sha256", big.split(":")[1] + ".partial")
        os.makedirs(os.path.dirname(partial))
        with open(partial, "wb") as f:
            f.write(img.layers[0][:1000])

        def wrong_range(h, method, path):
            if path.endswith(big) and h.headers.get("Range"):
                data = reg.blobs[big]
                h.send(206, data[10:], {"Content-Range": "bytes 10-%d/%d" % (len(data) - 1, len(data))})
                return True
            return False
        reg.fault = wrong_range
        res = self.pull(reg, "badcr/app:v1")
        self.assertStoreHas(img)
        # The resume was answered from the wrong offset: dropped unread, and the blob asked again whole.
        ranges = [hd.get("Range") for m, p, hd in reg.log if m == "GET" and p.endswith(big)]
        self.assertEqual(ranges, ["bytes=1000-", None])
        self.assertEqual(res.downloaded_bytes, img.size)

    def test_429_retry_after(self):
        reg = self.registry()
        img = reg.push("rate/app", "v1", Image())
        hits = []

        def limit(h, method, path):
            if "/blobs/" in path and not hits:
                hits.append(time.monotonic())
                h.error(429, "TOOMANYREQUESTS", headers={"Retry-After": "1"})
                return True
            return False
        reg.fault = limit
        start = time.monotonic()
        self.pull(reg, "rate/app:v1", jobs=1)
        self.assertGreaterEqual(time.monotonic() - start, 0.95)  # Retry-After honoured, not the 10 ms backoff
        self.assertStoreHas(img)

    def test_503_storm_gives_up(self):
        reg = self.registry()
        reg.push("storm/app", "v1", Image())
        reg.fault = lambda h, m, p: h.error(503, "UNAVAILABLE") or True
        with self.assertRaises(rp.RegistryError) as cm:
            self.pull(reg, "storm/app:v1")
        self.assertIn("503", str(cm.exception))
        self.assertEqual(len(reg.requests(kind="manifests")), rp.RETRIES + 1)

    def test_corrupt_blob(self):
        reg = self.registry()
        img = reg.push("corrupt/app", "v1", Image())
        bad = sha256(img.layers[1])
        reg.blobs[bad] = bytes([img.layers[1][0] ^ 1]) + img.layers[1][1:]
        with self.assertRaises(rp.DigestMismatch) as cm:
            self.pull(reg, "corrupt/app:v1")
        self.assertEqual(cm.exception.exit_code, 5)
        blobs = os.path.join(self.home, "blobs", "sha256")
        self.assertFalse(os.path.exists(os.path.join(blobs, bad.split(":")[1])))
        self.assertFalse(os.path.exists(os.path.join(blobs, bad.split(":")[1] + ".partial")))
        # Downloads cancelled with it keep their .partial (to resume); whatever has a final name is right.
        self.assertEqual([f for f in self.stray_files() if not f.endswith(".partial")], [])
        for name in os.listdir(blobs):
            if re.match(r"^[0-9a-f]{64}$", name):
                with open(os.path.join(blobs, name), "rb") as f:
                    self.assertEqual(hashlib.sha256(f.read()).hexdigest(), name)

    def test_a_big_blob_is_written_back_while_it_arrives(self):
        """Every FLUSH_BYTES written, an fdatasync of the .partial starts on a helper thread (the
        download goes on); all of them end before the fsync that precedes the rename."""
        reg = self.registry()
        img = reg.push("flush/app", "v1", Image(layers=[make_layer({"big": os.urandom(3 * 1024 * 1024)})]))
        digest = sha256(img.layers[0])
        reg.fault = slow_blob(reg, digest, chunk=65536, delay=0.005)
        self.addCleanup(setattr, rp, "FLUSH_BYTES", rp.FLUSH_BYTES)
        rp.FLUSH_BYTES = 512 * 1024
        synced, events = [], []
        real_sync, real_fsync = os.fdatasync, os.fsync

        def fdatasync(fd):
            synced.append(os.fstat(fd).st_size)
            time.sleep(0.05)  # a slow disk: the download must not wait for it
            real_sync(fd)
            events.append("synced")

        def fsync(fd):
            events.append("fsync")
            real_fsync(fd)
        self.addCleanup(setattr, os, "fdatasync", real_sync)
        self.addCleanup(setattr, os, "fsync", real_fsync)
        os.fdatasync, os.fsync = fdatasync, fsync
        self.pull(reg, "flush/app:v1")
        self.assertStoreHas(img)
        size = len(img.layers[0])
        # While it arrived, not only at its end (the last one may start on the last chunk).
        self.assertGreaterEqual(len([n for n in synced if n < size]), 2, synced)
        self.assertEqual(sorted(synced), synced)
        last_fsync = len(events) - 1 - events[::-1].index("fsync")
        self.assertNotIn("synced", events[last_fsync:])  # no write-back still under way at the end

    def test_a_corrupt_blob_is_the_error_while_a_sibling_still_downloads(self):
        """One download fails while another is still running: the failure is what the pull says
        (exit 5), not the "interrupted" of the sibling it cancels (a race CI once lost)."""
        reg = self.registry()
        img = reg.push("corrupt/app", "v1", Image(layers=[make_layer({"big": os.urandom(2 * 1024 * 1024)}),
                                                          make_layer({"small": b"s"})]))
        slow, bad = sha256(img.layers[0]), sha256(img.layers[1])
        reg.blobs[bad] = bytes([img.layers[1][0] ^ 1]) + img.layers[1][1:]
        stall = threading.Event()
        self.addCleanup(stall.set)
        reg.fault = slow_blob(reg, slow, stall=stall)  # one chunk, then silence
        start = time.monotonic()
        with self.assertRaises(rp.DigestMismatch):
            self.pull(reg, "corrupt/app:v1", jobs=2)
        self.assertLess(time.monotonic() - start, 4.0)  # the sibling was cancelled, not waited for
        code, out, err = self.main(*self.cli_args("--jobs", "2", reg.host + "/corrupt/app:v1"))
        self.assertEqual(code, 5, err)
        self.assertNotIn("interrupted", err)
        self.assertEqual(self.image_rows(), [])

    def test_overlong_body_stopped(self):
        reg = self.registry()
        img = reg.push("long/app", "v1", Image())
        target = sha256(img.layers[1])
        sent = []

        def endless(h, method, path):
            if path.endswith(target):
                h.send_response(200)
                h.send_header("Transfer-Encoding", "chunked")
                h.end_headers()
                chunk = reg.blobs[target]
                try:
                    for _ in range(200):  # 40 MB offered for a 200 kB blob
                        h.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        sent.append(len(chunk))
                    h.wfile.write(b"0\r\n\r\n")
                except (BrokenPipeError, ConnectionResetError):
                    pass
                h.close_connection = True
                return True
            return False
        reg.fault = endless
        with self.assertRaises(rp.SizeMismatch):
            self.pull(reg, "long/app:v1")
        self.assertFalse(os.path.exists(os.path.join(self.home, "blobs", "sha256", target.split(":")[1])))


class InterruptionTests(Base):
    def cli(self, *argv, **kw):
        return subprocess.Popen([sys.executable, os.path.join(HERE, "registry_pull.py"), *self.cli_args(*argv)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)

    def big(self, reg, name):
        img = reg.push(name, "v1", Image(layers=[make_layer({"big": os.urandom(4 * 1024 * 1024)}),
                                                  make_layer({"small": b"s"})]))
        digest = sha256(img.layers[0])
        return img, digest, os.path.join(self.home, "blobs", "sha256", digest.split(":")[1])

    def test_sigkill_then_resume(self):
        reg = self.registry()
        img, digest, final = self.big(reg, "kill/app")
        reg.fault = slow_blob(reg, digest)
        proc = self.cli(reg.host + "/kill/app:v1")
        self.addCleanup(proc.wait)
        self.assertTrue(wait_for(lambda: os.path.exists(final + ".partial") and
                                 os.path.getsize(final + ".partial") > 512 * 1024))
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        have = os.path.getsize(final + ".partial")
        self.assertFalse(os.path.exists(final))
        self.assertEqual(self.image_rows(), [])
        reg.fault = None
        reg.log.clear()
        res = self.pull(reg, "kill/app:v1")
        self.assertStoreHas(img)
        ranges = [hd.get("Range") for m, p, hd in reg.log if p.endswith(digest)]
        self.assertEqual(len(ranges), 1)
        self.assertEqual(int(ranges[0][6:-1]), have)  # resumed where the killed process stopped
        self.assertLess(res.downloaded_bytes, img.size - have + 1)

    def test_sigint_exits_130_promptly(self):
        reg = self.registry()
        img, digest, final = self.big(reg, "int/app")
        stall = threading.Event()
        self.addCleanup(stall.set)
        reg.fault = slow_blob(reg, digest, stall=stall)  # one chunk, then silence
        # Python raises KeyboardInterrupt only if SIGINT was not ignored when it started, and a test
        # run in the background (`cmd &` in a script) ignores it: the child installs the handler itself.
        code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                "import registry_pull; sys.exit(registry_pull.main(sys.argv[1:]))")
        proc = subprocess.Popen([sys.executable, "-c", code, *self.cli_args(reg.host + "/int/app:v1")], cwd=HERE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(end_process, proc)
        self.assertTrue(wait_for(lambda: os.path.exists(final + ".partial") and
                                 os.path.getsize(final + ".partial") > 0))
        time.sleep(0.2)
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        elapsed = time.monotonic() - start
        self.assertEqual(proc.returncode, 130, err)
        self.assertLess(elapsed, 3.0)  # not the 60 s read timeout
        err = self.without_progress(err)
        self.assertEqual(err.count(b"\n"), 1, err)
        self.assertTrue(err.startswith(b"registry_pull: error: interrupted"), err)
        self.assertFalse(os.path.exists(final))
        self.assertEqual(self.image_rows(), [])
        stall.set()
        reg.fault = None
        self.pull(reg, "int/app:v1")
        self.assertStoreHas(img)

    def test_concurrent_processes_share_one_home(self):
        reg = self.registry(auth="bearer")
        base = make_layer({"base": os.urandom(1024 * 1024)})
        a = reg.push("con/a", "v1", Image(layers=[base, make_layer({"a": os.urandom(300000)})]))
        b = reg.push("con/b", "v1", Image(layers=[base, make_layer({"b": os.urandom(300000)})]))
        reg.fault = slow_blob(reg, sha256(base[0]), chunk=32768, delay=0.01)  # long enough to overlap
        for n in (2, 4):
            with self.subTest(case=n):
                shutil.rmtree(os.path.join(self.home, "blobs"), ignore_errors=True)
                for f in ("oci.db", "oci.db-wal", "oci.db-shm", "index.json"):
                    if os.path.exists(os.path.join(self.home, f)):
                        os.unlink(os.path.join(self.home, f))
                reg.log.clear()
                refs = [reg.host + ("/con/a:v1" if i % 2 == 0 else "/con/b:v1") for i in range(n)]
                procs = [self.cli(r) for r in refs]
                for p in procs:
                    out, err = p.communicate(timeout=120)
                    self.assertEqual(p.returncode, 0, err)
                blob_gets = [p for m, p in reg.requests("GET", "blobs")]
                self.assertEqual(len(blob_gets), len(set(blob_gets)), blob_gets)  # each blob once
                self.assertStoreHas(a)
                self.assertStoreHas(b)
                self.assertEqual(self.stray_files(), [])
                self.assertEqual(sorted(r for r, in self.image_rows()), sorted(set(refs)))
                with open(os.path.join(self.home, "index.json")) as f:
                    names = [m["annotations"]["org.opencontainers.image.ref.name"] for m in json.load(f)["manifests"]]
                self.assertEqual(sorted(names), sorted(set(refs)))

    def test_file_size_limit_is_a_storage_error(self):
        reg = self.registry()
        img, digest, final = self.big(reg, "full/app")
        code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
                "import registry_pull; sys.exit(registry_pull.main(sys.argv[1:]))")
        proc = subprocess.run([sys.executable, "-c", code, *self.cli_args(reg.host + "/full/app:v1")], cwd=HERE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 7, proc.stderr)
        self.assertEqual(self.without_progress(proc.stderr).count(b"\n"), 1, proc.stderr)
        self.assertIn(b"File too large", proc.stderr)
        self.assertFalse(os.path.exists(final))
        self.assertEqual(self.image_rows(), [])
        self.pull(reg, "full/app:v1")  # room again: it resumes and completes
        self.assertStoreHas(img)

    def mount_tmpfs(self, options):
        path = tempfile.mkdtemp(prefix="rp-mnt-")
        self.addCleanup(os.rmdir, path)
        if os.geteuid() != 0 or not shutil.which("mount"):
            self.skipTest("needs root to mount a tmpfs")
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if proc.returncode != 0:
            self.skipTest("cannot mount a tmpfs here: %s" % proc.stderr.decode().strip())
        self.addCleanup(subprocess.run, ["umount", "-l", path])
        return path

    def test_disk_full(self):
        reg = self.registry()
        img, digest, final = self.big(reg, "enospc/app")
        home = self.mount_tmpfs("size=2m")
        code, out, err = self.main("--home", home, "--platform", "linux/amd64", reg.host + "/enospc/app:v1")
        self.assertEqual(code, 7, err)
        self.assertIn("No space left", err)
        self.assertFalse(os.path.exists(os.path.join(home, "blobs", "sha256", digest.split(":")[1])))

    def test_read_only_home_fails_before_any_request(self):
        reg = self.registry()
        reg.push("ro/app", "v1", Image())
        if os.geteuid() == 0:
            home = self.mount_tmpfs("ro,size=1m")
        else:
            home = os.path.join(self.home, "ro")
            os.makedirs(home)
            os.chmod(home, 0o555)
        code, out, err = self.main("--home", os.path.join(home, "store"), reg.host + "/ro/app:v1")
        self.assertEqual(code, 7, err)
        self.assertIn("cannot write to the store", err)
        self.assertEqual(reg.log, [])


# --------------------------------------------------------------------------- signatures


class EcdsaTests(unittest.TestCase):
    def test_embedded_wycheproof_cases(self):
        for pem, msg, sig, valid, note in WYCHEPROOF_CASES:
            with self.subTest(case=note):
                self.assertIs(rp.verify_signature(pem, bytes.fromhex(sig), bytes.fromhex(msg)), valid)

    def test_every_wycheproof_vector(self):
        """True for every valid case, False for every invalid one (acceptable: either)."""
        if not os.path.exists(WYCHEPROOF):
            self.skipTest("the Wycheproof vectors are not beside the clone (%s)" % WYCHEPROOF)
        with open(WYCHEPROOF) as f:
            suite = json.load(f)
        counts = {"valid": 0, "invalid": 0}
        for group in suite["testGroups"]:
            pem = group["publicKeyPem"]
            for case in group["tests"]:
                got = rp.verify_signature(pem, bytes.fromhex(case["sig"]), bytes.fromhex(case["msg"]))
                if case["result"] == "valid":
                    self.assertTrue(got, case["tcId"])
                elif case["result"] == "invalid":
                    self.assertFalse(got, case["tcId"])
                counts[case["result"]] = counts.get(case["result"], 0) + 1
        self.assertGreater(counts["valid"], 100)
        self.assertGreater(counts["invalid"], 200)

    def test_openssl_keys_and_malformed_input(self):
        keys = Keys(self)
        key, pub = keys.pair()
        other, other_pub = keys.pair()
        with open(pub, "rb") as f:
            pem = f.read()
        sig = keys.sign(key, b"payload")
        self.assertTrue(rp.verify_signature(pem, sig, b"payload"))
        self.assertTrue(rp.verify_signature(pem.decode(), sig, b"payload"))
        self.assertFalse(rp.verify_signature(pem, sig, b"payload!"))
        with open(other_pub, "rb") as f:
            self.assertFalse(rp.verify_signature(f.read(), sig, b"payload"))
        self.assertFalse(rp.verify_signature(pem, sig[:-1], b"payload"))
        for junk in (b"", b"not a key", pem[:40], None, 42):
            self.assertFalse(rp.verify_signature(junk, sig, b"payload"))
        self.assertFalse(rp.verify_signature(pem, "text", b"payload"))


class SignedPullTests(Base):
    def signed(self, keys, key, repo="team/prod", identity=None, **kw):
        reg = self.registry()
        img = reg.push(repo, "v1", Image())
        keys.cosign(reg, repo, img.digest, key, identity or "%s/%s" % (reg.host, repo), **kw)
        return reg, img

    def verify_pull(self, reg, repo, pub, *extra):
        layout, root = os.path.join(self.home, "layout"), os.path.join(self.home, "root")
        code, out, err = self.main(*self.cli_args("--verify-key", pub, "--oci-layout", layout, "--rootfs", root,
                                                  *extra, "%s/%s:v1" % (reg.host, repo)))
        return code, err, layout, root

    def assertRefused(self, code, err, layout, root, why):
        self.assertEqual(code, 8, err)
        self.assertOneErrorLine(err)
        self.assertIn(why, err)
        self.assertFalse(os.path.exists(layout))
        self.assertFalse(os.path.exists(root))
        self.assertEqual(self.image_rows(), [])

    def test_a_good_signature_passes(self):
        keys = Keys(self)
        key, pub = keys.pair()
        reg, img = self.signed(keys, key)
        code, err, layout, root = self.verify_pull(reg, "team/prod", pub)
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isdir(root))
        self.assertEqual(len(self.image_rows()), 1)

    def test_any_one_of_several_keys_is_enough(self):
        keys = Keys(self)
        key, pub = keys.pair()
        _, other_pub = keys.pair()
        reg, img = self.signed(keys, key)
        code, err, _, _ = self.verify_pull(reg, "team/prod", other_pub, "--verify-key", pub)
        self.assertEqual(code, 0, err)

    def test_what_is_refused(self):
        keys = Keys(self)
        key, pub = keys.pair()
        other, _ = keys.pair()
        cases = [
            ("tampered payload", dict(signed_bytes=b"something else"), "another key"),
            ("another key", dict(key=other), "another key"),
            ("another digest", dict(digest="sha256:" + "1" * 64), "another digest"),
            ("another repository", dict(identity="REG/team/debug"), "another repository"),
            ("another type", dict(kind="cosign container image attestation"), "another type"),
        ]
        for name, kw, why in cases:
            with self.subTest(case=name):
                reg = self.registry()
                img = reg.push("team/prod", "v1", Image())
                identity = kw.pop("identity", "REG/team/prod").replace("REG", reg.host)
                signing_key = kw.pop("key", key)
                digest = kw.pop("digest", img.digest)
                if digest != img.digest:  # a real signature, for another image, under this image's tag
                    _, data = keys.cosign(reg, "team/prod", digest, signing_key, identity)
                    reg.manifests[("team/prod", img.digest.replace(":", "-") + ".sig")] = (rp.MT_OCI_MANIFEST, data)
                else:
                    keys.cosign(reg, "team/prod", img.digest, signing_key, identity, **kw)
                code, err, layout, root = self.verify_pull(reg, "team/prod", pub)
                self.assertRefused(code, err, layout, root, why)
                shutil.rmtree(self.home)
                os.makedirs(self.home)

    def test_no_signature_at_all(self):
        keys = Keys(self)
        _, pub = keys.pair()
        reg = self.registry()
        reg.push("team/prod", "v1", Image())
        code, err, layout, root = self.verify_pull(reg, "team/prod", pub)
        self.assertRefused(code, err, layout, root, "no signature")

    def test_signed_identity_accepts_the_upstream_name(self):
        """A copy in a private registry keeps its upstream signature: --signed-identity accepts it."""
        keys = Keys(self)
        key, pub = keys.pair()
        reg, img = self.signed(keys, key, identity="docker.io/library/alpine")
        code, err, layout, root = self.verify_pull(reg, "team/prod", pub)
        self.assertRefused(code, err, layout, root, "another repository")
        code, err, layout, root = self.verify_pull(reg, "team/prod", pub, "--signed-identity", "alpine")
        self.assertEqual(code, 0, err)

    def test_a_signed_index_covers_the_image_it_names(self):
        keys = Keys(self)
        key, pub = keys.pair()
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8")]
        index = reg.push_index("team/multi", "v1", images)
        keys.cosign(reg, "team/multi", index, key, "%s/team/multi" % reg.host)
        code, err, _, _ = self.verify_pull(reg, "team/multi", pub)
        self.assertEqual(code, 0, err)

    def test_a_sigstore_bundle_referrer(self):
        keys = Keys(self)
        key, pub = keys.pair()
        other, _ = keys.pair()
        cases = [("other key", other, "team/prod", None, 8), ("an SBOM attestation, not a signature", key, "team/prod",
                                                             "https://spdx.dev/Document", 8),
                 ("another repository", key, "team/debug", None, 8), ("right key", key, "team/prod", None, 0)]
        for name, signer, repo, predicate, code_wanted in cases:
            with self.subTest(case=name):
                reg = self.registry()
                img = reg.push("team/prod", "v1", Image())
                bundle = keys.bundle(signer, img.digest, "%s/%s" % (reg.host, repo),
                                     **({"predicate": predicate} if predicate else {}))
                art = Artifact({None: bundle}, artifact_type=rp.MT_SIGSTORE_BUNDLE, layer_type=rp.MT_SIGSTORE_BUNDLE,
                               subject={"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest,
                                        "size": len(img.manifest)})
                push_artifact(reg, "team/prod", None, art)
                referrers_api(reg)
                code, err, layout, root = self.verify_pull(reg, "team/prod", pub)
                self.assertEqual(code, code_wanted, err)
                shutil.rmtree(self.home)
                os.makedirs(self.home)

    def test_several_platforms_are_checked_too(self):
        """--platform all or several --platform: the index (or every image taken) must be signed."""
        keys = Keys(self)
        key, pub = keys.pair()
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8")]
        index = reg.push_index("team/multi", "v1", images, attestations=False)
        layout = os.path.join(self.home, "layout")
        for argv in (["--platform", "all"], ["--platform", "linux/amd64", "--platform", "linux/arm64"]):
            with self.subTest(argv=argv):
                code, out, err = self.main("--home", self.home, "--verify-key", pub, "--oci-layout", layout, *argv,
                                           reg.host + "/team/multi:v1")
                self.assertEqual(code, 8, err)
                self.assertFalse(os.path.exists(layout))
        keys.cosign(reg, "team/multi", index, key, "%s/team/multi" % reg.host)
        code, out, err = self.main("--home", self.home, "--verify-key", pub, "--oci-layout", layout, "--platform",
                                   "all", reg.host + "/team/multi:v1")
        self.assertEqual(code, 0, err)
        code, out, err = self.main("--home", self.home, "--platform", "all", "--output", layout,
                                   reg.host + "/team/multi:v1")
        self.assertEqual(code, 2, err)  # an option the several-platform pull would ignore is refused
        self.assertIn("--output", err)

    def test_a_bad_key_file_is_a_usage_error(self):
        path = os.path.join(self.home, "k.pub")
        with open(path, "w") as f:
            f.write("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n")
        code, out, err = self.main(*self.cli_args("--verify-key", path, "127.0.0.1:1/x:y"))
        self.assertEqual(code, 2, err)
        self.assertIn("P-256", err)


# --------------------------------------------------------------------------- rootfs


class RootfsTests(Base):
    def test_a_whiteout_or_opaque_marker_after_a_layers_own_entries_keeps_them(self):
        """A whiteout hides lower layers only, wherever the layer lists it: what the same layer
        wrote below the name before it stays (in a parent of no metadata of its own), as --tar
        gives it; only the lower contents go."""
        stacks = [
            ("whiteout", [[("b", "dir", None, 0o700), ("b/b", "dir", None, 0o755), ("b/b/f", "file", b"0", 0o644),
                           ("b/old", "file", b"0", 0o644)],
                          [("b/b", "symlink", "elsewhere", 0o777), ("b/new", "file", b"1", 0o600), (".wh.b", "file",
                                                                                                    b"", 0o644)]],
             {"b": "dir", "b/b": "symlink", "b/new": "file"}),
            # A lower directory the layer lists again and then whites out ("-c" sorts before
            # ".wh.-c"): its lower contents go; the layer's directory (its mode) and entries stay.
            ("declared, then whited out", [[("-c", "dir", None, 0o700), ("-c/x", "file", b"0", 0o644)],
                                           [("-c", "dir", None, 0o750), ("-c/new", "file", b"1", 0o600),
                                            (".wh.-c", "file", b"", 0o644)]],
             {"-c": "dir", "-c/new": "file"}),
            ("opaque", [[("c", "dir", None, 0o755), ("c/e", "dir", None, 0o711), ("c/e/lower", "file", b"0", 0o644),
                         ("c/gone", "file", b"0", 0o644)],
                        [("c/e/e/d/a", "symlink", "../a", 0o777), ("c/.wh..wh..opq", "file", b"", 0o644)]],
             {"c": "dir", "c/e": "dir", "c/e/e": "dir", "c/e/e/d": "dir", "c/e/e/d/a": "symlink"}),
        ]
        reg = self.registry()
        for i, (what, layers, want) in enumerate(stacks):
            with self.subTest(stack=what):
                reg.push("fs/own%d" % i, "v1", layered_image(*layers))
                root = os.path.join(self.home, "own%d" % i)
                self.pull(reg, "fs/own%d:v1" % i, rootfs=root)
                entries, _ = tree(root)
                self.assertEqual(dict((k, e["type"]) for k, e in entries.items()), want)
                if what == "declared, then whited out":
                    self.assertEqual(entries["-c"]["mode"], "0750")  # the layer's own, not the lower one's
                else:
                    kept_as_parent = "b" if what == "whiteout" else "c/e"
                    self.assertEqual(entries[kept_as_parent]["mode"], "0755")  # the lower directory's own is gone
                if IS_ROOT and shutil.which("tar"):
                    flat = os.path.join(self.home, "own%d.tar" % i)
                    self.pull(reg, "fs/own%d:v1" % i, tar=flat)
                    self.assertEqual(untimed_dirs(tree(gnu_tar_extract(self, flat))), untimed_dirs(tree(root)))

    def test_what_a_layer_makes_below_a_directory_it_declares_again_is_its_own(self):
        """A lower directory the layer lists again is no tree of its own: what the layer then
        makes below it is still marked its own, so an opaque marker listed after them keeps it
        (a directory it declares, with its mode; a new one with what it holds) and hides only
        the lower contents."""
        layers = [[("a", "dir", None, 0o755), ("a/b", "dir", None, 0o700), ("a/b/old", "file", b"0", 0o644),
                   ("a/x", "file", b"0", 0o644)],
                  [("a", "dir", None, 0o750), ("a/b", "dir", None, 0o711), ("a/b/f", "file", b"1", 0o600),
                   ("a/n", "dir", None, 0o701), ("a/n/g", "file", b"2", 0o640), ("a/.wh..wh..opq", "file", b"", 0o644)]]
        reg = self.registry()
        reg.push("fs/again", "v1", layered_image(*layers))
        root = os.path.join(self.home, "again")
        self.pull(reg, "fs/again:v1", rootfs=root)
        entries, _ = tree(root)
        self.assertEqual(dict((k, (e["type"], e["mode"])) for k, e in entries.items()),
                         {"a": ("dir", "0750"), "a/b": ("dir", "0711"), "a/b/f": ("file", "0600"),
                          "a/n": ("dir", "0701"), "a/n/g": ("file", "0640")})
        if IS_ROOT and shutil.which("tar"):
            flat = os.path.join(self.home, "again.tar")
            self.pull(reg, "fs/again:v1", tar=flat)
            self.assertEqual(untimed_dirs(tree(gnu_tar_extract(self, flat))), untimed_dirs(tree(root)))

    def test_rootfs_whiteouts_links_modes(self):
        reg = self.registry()
        reg.push("fs/app", "v1", layered_image(*ROOTFS_LAYERS))
        target = os.path.join(self.home, "out", "rootfs")
        res = self.pull(reg, "fs/app:v1", rootfs=target)
        self.assertEqual(dict(res.outputs)["rootfs"], target)
        snap = snapshot(target)
        self.assertNotIn("a/y", snap)                      # whiteout in layer 3
        self.assertEqual(snap["a/x"][2], b"x3")             # whited out in 2, back in 3
        self.assertEqual(snap["b/z"][:3], ("file", "0o640", b"z2"))
        self.assertEqual(snap["b/w"][2], b"w3")
        # Opaque in layer 2 hid c/1 and c/sub/deep; layer 3 made c/sub again.
        self.assertEqual(sorted(k for k in snap if k.startswith("c/")), ["c/2", "c/3", "c/sub"])
        self.assertEqual(snap["c/sub"], ("dir", "0o700"))
        self.assertEqual(snap["usr/lib/libfoo.so"][2], b"foo")  # written through the lib symlink
        self.assertEqual(snap["lib"], ("symlink", "usr/lib"))
        self.assertEqual(snap["bin/tool"][1], "0o4755")
        self.assertEqual(snap["bin/tool"][4], 2)            # hard link shares the inode
        self.assertEqual(snap["bin/hard"][2], b"#!/bin/sh\n")
        self.assertNotIn("s1", snap)
        self.assertEqual(snap["s2"], ("symlink", "bin/tool"))
        self.assertEqual(snap["abs"], ("symlink", "/etc/passwd"))
        self.assertEqual(snap["ro"], ("dir", "0o555"))
        self.assertEqual(snap["ro/f"][:3], ("file", "0o444", b"in a read-only dir"))
        self.assertEqual(snap["fifo"], ("fifo", "0o644"))
        self.assertEqual(snap["a/x"][3], 1600000000 + len("a/x"))
        self.assertEqual(os.listdir(os.path.dirname(target)), ["rootfs"])  # no temp sibling left
        if os.geteuid() == 0:
            self.assertEqual(snap["owner:owned"], (1234, 5678))

    def test_every_entry_of_a_big_gzip_layer_is_extracted(self):
        # gzip hands the tar over in chunks that end anywhere, not on 512-byte blocks: a header
        # cut between two chunks must be read whole (a short read there is tarfile's end of
        # the archive: the rest of the layer would be dropped without a word).
        rng = random.Random(7)
        files = dict(("d%02d/f%04d" % (i // 1000, i), bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 700))))
                     for i in range(6000))
        reg = self.registry()
        reg.push("many/cut", "v1", Image(layers=[make_layer(files)]))
        target = os.path.join(self.home, "rootfs")
        res = self.pull(reg, "many/cut:v1", rootfs=target)
        got = dict((os.path.relpath(os.path.join(d, f), target), None) for d, _, fs in os.walk(target) for f in fs)
        self.assertEqual(sorted(got), sorted(files))
        for name in ("d00/f0000", "d02/f2999", "d05/f5999"):
            with open(os.path.join(target, name), "rb") as f:
                self.assertEqual(f.read(), files[name])
        flat = os.path.join(self.home, "flat.tar")
        rp.export_tar(res, flat)
        with tarfile.open(flat) as tar:
            self.assertEqual(sorted(m.name for m in tar.getmembers() if m.isfile()), sorted(files))

    def test_entries_scattered_over_more_directories_than_descriptors_kept(self):
        # Files visiting 3x rp._DIR_FDS directories in a random order: the extractor lets kept
        # descriptors go and walks again, each file lands in its own directory, none leaks.
        rng = random.Random(11)
        dirs = ["t%d/u%03d" % (i % 7, i) for i in range(3 * rp._DIR_FDS)]
        files = dict(("%s/f%05d" % (rng.choice(dirs), i), b"%d" % i) for i in range(4 * len(dirs)))
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data in files.items():  # in the random order they were made
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
        raw = buf.getvalue()
        reg = self.registry()
        reg.push("many/dirs", "v1", Image(layers=[(gzip.compress(raw), sha256(raw))]))
        if not os.path.isdir("/proc/self/fd"):
            self.skipTest("needs /proc/self/fd to count open descriptors")
        self.pull(reg, "many/dirs:v1")
        before = len(os.listdir("/proc/self/fd"))
        target = os.path.join(self.home, "rootfs")
        self.pull(reg, "many/dirs:v1", rootfs=target)
        self.assertEqual(len(os.listdir("/proc/self/fd")), before)
        for name, data in files.items():
            with open(os.path.join(target, name), "rb") as f:
                self.assertEqual(f.read(), data, name)

    def test_device_nodes_only_when_allowed(self):
        reg = self.registry()
        reg.push("dev/app", "v1", layered_image([("dev", "dir", None, 0o755), ("dev/null", "chr", None, 0o666),
                                                 ("dev/keep", "file", b"k", 0o644)]))
        probe = os.path.join(self.home, "probe-node")
        try:
            os.mknod(probe, 0o600 | 0o020000, os.makedev(1, 3))
            can_mknod = True
        except (PermissionError, OSError):
            can_mknod = False
        target = os.path.join(self.home, "rootfs")
        self.pull(reg, "dev/app:v1", rootfs=target)
        self.assertTrue(os.path.isfile(os.path.join(target, "dev", "keep")))
        node = os.path.join(target, "dev", "null")
        if can_mknod:
            import stat
            st = os.lstat(node)
            self.assertTrue(stat.S_ISCHR(st.st_mode))
            self.assertEqual((os.major(st.st_rdev), os.minor(st.st_rdev)), (1, 3))
        else:
            self.assertFalse(os.path.lexists(node))  # skipped, not an error

    def test_zstd_without_a_decoder_is_a_clear_error(self):
        if ZSTD is None:
            self.skipTest("needs the zstd program to make a zstd layer")
        reg = self.registry()
        reg.push("zst/app", "v1", layered_image([("f", "file", b"z", 0o644)], compress="zstd"))
        real = shutil.which
        rp.shutil.which = lambda name, *a, **kw: None if name == "zstd" else real(name, *a, **kw)
        self.addCleanup(setattr, rp.shutil, "which", real)
        try:
            import compression.zstd  # noqa: F401
            self.skipTest("this Python decodes zstd itself")
        except ImportError:
            pass
        with self.assertRaises(rp.UnsupportedError) as cm:
            self.pull(reg, "zst/app:v1", rootfs=os.path.join(self.home, "rootfs"))
        self.assertIn("compression.zstd", str(cm.exception))
        self.assertIn("zstd program", str(cm.exception))
        self.assertFalse(os.path.exists(os.path.join(self.home, "rootfs")))

    def test_rootfs_refuses_existing_nonempty_dir(self):
        reg = self.registry()
        reg.push("fs/app", "v1", layered_image(*ROOTFS_LAYERS))
        target = os.path.join(self.home, "full")
        os.makedirs(target)
        open(os.path.join(target, "keep"), "w").close()
        code, out, err = self.main("--home", self.home, "--rootfs", target, reg.host + "/fs/app:v1")
        self.assertEqual(code, 2, err)
        self.assertEqual(os.listdir(target), ["keep"])
        self.assertEqual(reg.requests(kind="blobs"), [])  # refused before any download

    def test_hostile_layers(self):
        outside = tempfile.mkdtemp(prefix="rp-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        cases = {
            "traversal": [[("../../escaped", "file", b"x", 0o644)]],
            "absolute": [[(outside + "/abs", "file", b"x", 0o644)]],
            "hardlink-out": [[("h", "link", "../../../etc/passwd", 0o644)]],
            "hardlink-missing": [[("h", "link", "nothing/here", 0o644)]],
            "whiteout-dotdot": [[("a", "dir", None, 0o755)], [("a/.wh...", "file", b"", 0o644)]],
        }
        reg = self.registry()
        for name, layers in cases.items():
            with self.subTest(case=name):
                reg.push("hostile/" + name, "v1", layered_image(*layers))
                target = os.path.join(self.home, "rootfs-" + name)
                code, out, err = self.main(*self.cli_args("--rootfs", target, reg.host + "/hostile/%s:v1" % name))
                self.assertEqual(code, 5, err)
                self.assertIn("hostile", err)
                self.assertFalse(os.path.exists(target))
                self.assertEqual([x for x in os.listdir(self.home) if "rootfs" in x], [])
        self.assertEqual(os.listdir(outside), [])

    def test_symlink_escape_is_contained(self):
        outside = tempfile.mkdtemp(prefix="rp-outside-")
        self.addCleanup(shutil.rmtree, outside, True)
        reg = self.registry()
        reg.push("esc/app", "v1", layered_image(
            [("esc", "symlink", outside, 0o777), ("up", "symlink", "../../../../../../..", 0o777)],
            [("esc/pwned", "file", b"x", 0o644), ("up" + outside + "/pwned2", "file", b"y", 0o644)]))
        target = os.path.join(self.home, "rootfs")
        self.pull(reg, "esc/app:v1", rootfs=target)
        self.assertEqual(os.listdir(outside), [])  # nothing written through the links
        # As a chroot would resolve them: inside the root.
        inner = os.path.join(target, outside.lstrip("/"))
        self.assertEqual(sorted(os.listdir(inner)), ["pwned", "pwned2"])

    def test_diff_id_mismatch(self):
        reg = self.registry()
        img = layered_image([("f", "file", b"data", 0o644)])
        img.edit(config=lambda cfg: cfg["rootfs"].update(diff_ids=[sha256(b"something else")]))
        reg.push("diff/app", "v1", img)
        target = os.path.join(self.home, "rootfs")
        code, out, err = self.main(*self.cli_args("--rootfs", target, reg.host + "/diff/app:v1"))
        self.assertEqual(code, 5, err)
        self.assertIn("diff_id", err)
        self.assertFalse(os.path.exists(target))

    def test_uncompressed_and_zstd_layers(self):
        reg = self.registry()
        kinds = [None] + (["zstd"] if ZSTD else [])
        for kind in kinds:
            with self.subTest(case=kind):
                reg.push("comp/%s" % str(kind).lower(), "v1", layered_image(
                    [("f", "file", b"hello " + str(kind).encode(), 0o644)], compress=kind))
                target = os.path.join(self.home, "rootfs-%s" % kind)
                self.pull(reg, "comp/%s:v1" % str(kind).lower(), rootfs=target)
                with open(os.path.join(target, "f"), "rb") as f:
                    self.assertEqual(f.read(), b"hello " + str(kind).encode())
        if not ZSTD:
            self.skipTest("zstd program absent: the zstd layer case did not run")

    def hostile_tar(self, build):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            build(tar)
        raw = buf.getvalue()
        return Image(layers=[(gzip.compress(raw, 1), sha256(raw))])

    def test_huge_pax_header_and_impossible_numbers_are_hostile(self):
        def huge(tar):
            info = tarfile.TarInfo("f")
            info.pax_headers = {"comment": "x" * (2 * 1024 * 1024)}
            tar.addfile(info, io.BytesIO(b""))

        def nan_time(tar):
            info = tarfile.TarInfo("f")
            info.pax_headers = {"mtime": "1e300"}
            tar.addfile(info, io.BytesIO(b""))
        reg = self.registry()
        for name, build in (("huge", huge), ("time", nan_time)):
            with self.subTest(case=name):
                reg.push("hostile/" + name, "v1", self.hostile_tar(build))
                target = os.path.join(self.home, "rootfs-" + name)
                code, out, err = self.main(*self.cli_args("--rootfs", target, reg.host + "/hostile/%s:v1" % name))
                self.assertEqual(code, 5, err)
                self.assertIn("hostile", err)
                self.assertFalse(os.path.exists(target))

    @unittest.skipUnless(shutil.which("tar") and shutil.which("truncate"), "needs GNU tar to make a sparse layer")
    def test_sparse_files_keep_their_holes(self):
        work = tempfile.mkdtemp(prefix="rp-sparse-")
        self.addCleanup(shutil.rmtree, work, True)
        big = os.path.join(work, "big")
        with open(big, "wb") as f:
            f.truncate(64 << 20)
            f.seek(1 << 20)
            f.write(b"hello")
            f.seek(40 << 20)
            f.write(b"world")
        reg = self.registry()
        for fmt in ("gnu", "posix"):
            with self.subTest(case=fmt):
                archive = os.path.join(work, fmt + ".tar")
                subprocess.run(["tar", "--sparse", "--format=" + fmt, "-C", work, "-cf", archive, "big"], check=True)
                with open(archive, "rb") as f:
                    raw = f.read()
                reg.push("sparse/" + fmt, "v1", Image(layers=[(gzip.compress(raw), sha256(raw))]))
                target = os.path.join(self.home, "rootfs-" + fmt)
                self.pull(reg, "sparse/%s:v1" % fmt, rootfs=target)
                out = os.path.join(target, "big")
                with open(out, "rb") as f, open(big, "rb") as g:
                    self.assertEqual(hashlib.sha256(f.read()).digest(), hashlib.sha256(g.read()).digest())
                self.assertLess(os.stat(out).st_blocks * 512, 8 << 20)  # the holes stayed holes
                flat = os.path.join(self.home, "flat-%s.tar" % fmt)  # --tar: the file's bytes, holes as zeros
                code, _, err = self.main(*self.cli_args("--tar", flat, reg.host + "/sparse/%s:v1" % fmt))
                self.assertEqual(code, 0, err)
                with tarfile.open(flat) as tar, open(big, "rb") as g:
                    member = tar.extractfile("big")
                    self.assertEqual(hashlib.sha256(member.read()).digest(), hashlib.sha256(g.read()).digest())


class RootfsOwnershipTests(Base):
    """Who may reach DIR, errors that keep their cause, bounded memory."""

    def test_existing_empty_dir_is_filled_in_place_and_keeps_its_mode(self):
        reg = self.registry()
        reg.push("fs/app", "v1", layered_image(*ROOTFS_LAYERS))
        target = os.path.join(self.home, "mine")
        os.mkdir(target)
        os.chmod(target, 0o710)
        before = os.stat(target)
        self.pull(reg, "fs/app:v1", rootfs=target)
        after = os.stat(target)
        self.assertEqual((after.st_ino, after.st_mode & 0o7777, after.st_uid), (before.st_ino, 0o710, before.st_uid))
        self.assertEqual(snapshot(target)["b/z"][:3], ("file", "0o640", b"z2"))

    def test_failure_empties_the_callers_dir_again(self):
        reg = self.registry()
        reg.push("fs/bad", "v1", layered_image([("ok", "file", b"x", 0o644), ("d", "dir", None, 0o755),
                                                ("d/f", "file", b"y", 0o644)],
                                               [("h", "link", "nothing/here", 0o644)]))
        target = os.path.join(self.home, "mine")
        os.mkdir(target)
        code, out, err = self.main(*self.cli_args("--rootfs", target, reg.host + "/fs/bad:v1"))
        self.assertEqual(code, 5, err)
        self.assertEqual(os.listdir(target), [])

    def test_new_dir_is_0700_until_complete_then_takes_the_images_root_mode(self):
        reg = self.registry()
        reg.push("fs/root", "v1", layered_image([(".", "dir", None, 0o751), ("f", "file", b"x", 0o644)]))
        seen = []
        real = rp._Unpacker.finish

        def spy(unpacker):
            seen.append(os.stat(unpacker.root).st_mode & 0o7777)
            return real(unpacker)
        rp._Unpacker.finish = spy
        self.addCleanup(setattr, rp._Unpacker, "finish", real)
        target = os.path.join(self.home, "new", "rootfs")
        self.pull(reg, "fs/root:v1", rootfs=target)
        self.assertEqual(seen, [0o700])
        expected = 0o751 if os.geteuid() == 0 else 0o751 & ~rp._umask()
        self.assertEqual(os.stat(target).st_mode & 0o7777, expected)

    @unittest.skipUnless(os.geteuid() == 0, "the warning is for root (who restores set-id bits and devices)")
    def test_root_is_warned_when_set_id_files_are_open_to_every_user(self):
        reg = self.registry()
        reg.push("fs/suid", "v1", layered_image([("bin", "dir", None, 0o755), ("bin/su", "file", b"x", 0o4755)]))
        open_parent = os.path.join(self.home, "open")
        closed_parent = os.path.join(self.home, "closed")
        os.mkdir(open_parent, 0o755)
        os.mkdir(closed_parent, 0o700)
        os.chmod(self.home, 0o755)
        code, out, err = self.main(*self.cli_args("--rootfs", os.path.join(open_parent, "rootfs"),
                                                  reg.host + "/fs/suid:v1"))
        self.assertEqual(code, 0, err)
        self.assertIn("set-id", err)
        self.assertIn("chmod 700 " + open_parent, err)
        self.assertEqual(os.stat(os.path.join(open_parent, "rootfs", "bin", "su")).st_mode & 0o7777, 0o4755)
        code, out, err = self.main(*self.cli_args("--rootfs", os.path.join(closed_parent, "rootfs"),
                                                  reg.host + "/fs/suid:v1"))
        self.assertEqual(code, 0, err)
        self.assertNotIn("set-id", err)

    def test_decompression_errors_name_their_cause(self):
        reg = self.registry()
        good = layered_image([("f", "file", os.urandom(200000), 0o644)])
        layer = good.layers[0]
        cases = {"truncated gzip": (layer[:len(layer) // 2], "truncated"),
                 "corrupt gzip": (layer[:20] + b"\xff" * 64 + layer[84:], "gzip stream is corrupt")}
        if ZSTD:
            zst = layered_image([("f", "file", os.urandom(3000), 0o644)], compress="zstd").layers[0]
            cases["corrupt zstd"] = (zst[:12] + b"\x00\xff" * 8 + zst[28:], "zstd could not decompress it (")
        for name, (blob, words) in cases.items():
            with self.subTest(case=name):
                img = Image(layers=[(blob, sha256(b"unused: decompression fails first"))])
                repo = "bad/" + name.replace(" ", "-")
                reg.push(repo, "v1", img)
                code, out, err = self.main(*self.cli_args("--rootfs", os.path.join(self.home, repo),
                                                          reg.host + "/%s:v1" % repo))
                self.assertEqual(code, 5, err)
                self.assertIn(words, err)
                self.assertNotRegex(err, r"\(\)|: $")  # the cause is there, not an empty detail
                self.assertFalse(os.path.exists(os.path.join(self.home, repo)))

    @unittest.skipUnless(ZSTD, "needs the zstd program to make a zstd layer")
    def test_file_size_limit_inside_a_zstd_layer_stays_a_storage_error(self):
        reg = self.registry()
        reg.push("zst/big", "v1", layered_image([("big", "file", os.urandom(3 << 20), 0o644)], compress="zstd"))
        self.pull(reg, "zst/big:v1")  # the store is warm: only the extraction meets the limit
        code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20)); "
                "import registry_pull; sys.exit(registry_pull.main(sys.argv[1:]))")
        target = os.path.join(self.home, "rootfs")
        proc = subprocess.run([sys.executable, "-c", code, *self.cli_args("--rootfs", target,
                                                                          reg.host + "/zst/big:v1")],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 7, proc.stderr)
        self.assertIn(b"File too large", proc.stderr)
        self.assertFalse(os.path.exists(target))

    def test_memory_stays_flat_with_200000_entries(self):
        reg = self.registry()
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for d in range(200):
                info = tarfile.TarInfo("d%03d" % d)
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
                for i in range(1000):
                    tar.addfile(tarfile.TarInfo("d%03d/f%04d" % (d, i)), io.BytesIO(b""))
        raw = buf.getvalue()
        img = Image(layers=[(gzip.compress(raw, 1), sha256(raw))])
        del buf, raw
        reg.push("many/files", "v1", img)
        self.pull(reg, "many/files:v1")
        # On a tmpfs where there is one: the point is memory, not this disk's speed at making files.
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else self.home
        out = tempfile.mkdtemp(prefix="rp-many-", dir=base)
        self.addCleanup(shutil.rmtree, out, True)
        # VmHWM, not ru_maxrss: Linux carries the maxrss of the forking (test) process across exec.
        code = ("import re, sys, registry_pull as rp; code = rp.main(sys.argv[1:]); "
                "print(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(code)")
        if not os.path.exists("/proc/self/status"):
            self.skipTest("needs /proc/self/status (Linux) to read the peak RSS of the child alone")
        proc = subprocess.run([sys.executable, "-c", code, *self.cli_args("-q", "--rootfs", os.path.join(out, "rootfs"),
                                                                          reg.host + "/many/files:v1")],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(len(os.listdir(os.path.join(out, "rootfs", "d199"))), 1000)
        peak_mb = int(proc.stdout.split()[-1]) / 1024
        # The same run of a one-file image: what the interpreter, the module (compiled afresh where
        # PYTHONDONTWRITEBYTECODE is set) and the pull cost without the entries.
        small = reg.push("few/files", "v1", Image(layers=[make_layer({"f": b"x"})]))
        self.pull(reg, "few/files:v1")
        proc = subprocess.run([sys.executable, "-c", code, *self.cli_args("-q", "--rootfs", os.path.join(out, "small"),
                                                                          reg.host + "/few/files:v1")],
                              cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        base_mb = int(proc.stdout.split()[-1]) / 1024
        self.assertEqual(small.digest, self.pull(reg, "few/files:v1").manifest_digest)
        self.assertLess(peak_mb - base_mb, 30, "peak RSS %.0f MB for a 200,000-entry layer, %.0f MB for one entry"
                        % (peak_mb, base_mb))


class RootfsExistingDirTests(Base):
    """An existing DIR someone else controls, and entries resolved through a planted symlink."""

    def swap_between_layers(self, reg, img, rootfs, attack):
        """A fault: the second layer's blob is served only after layer 1 is extracted into
        ``rootfs`` and ``attack()`` ran.  Returns a dict recording whether (and how) it ran."""
        layer2 = sha256(img.layers[1])
        ran = {}

        def fault(h, method, path):
            if method == "GET" and path.endswith(layer2) and "result" not in ran:
                ran["result"] = None
                if wait_for(lambda: os.path.exists(os.path.join(rootfs, "zz-layer1-done")), timeout=10):
                    ran["result"] = attack()
            return False
        reg.fault = fault
        return ran

    def assertVictimUnchanged(self, victim, before):
        after = host_state(victim)
        if after != before:
            changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
            self.fail("root changed the victim directory %s through the planted symlink: %s"
                      % (victim, ", ".join(changed)))

    @unittest.skipUnless(IS_ROOT and SETPRIV, "needs root and setpriv to act as uid 65534")
    def test_rootfs_dir_owned_by_another_user_is_refused_before_any_write(self):
        """An existing empty --rootfs DIR owned by another user is refused up front (exit 2, says why); nothing
        outside DIR changes."""
        parent = tempfile.mkdtemp(prefix="rp-sticky-")  # as /tmp is: sticky and world-writable
        self.addCleanup(subprocess.call, ["rm", "-rf", parent])
        os.chmod(parent, 0o1777)
        rootfs = os.path.join(parent, "x")
        os.mkdir(rootfs, 0o755)
        os.chown(rootfs, NOBODY, NOBODY)
        victim = victim_dir(self)
        before = host_state(victim)
        reg = self.registry()
        img = reg.push("swap/app", "v1", layered_image(*SWAP_LAYERS))

        def attack():  # uid 65534: move the root-made etc/ aside, plant etc -> the victim directory
            return subprocess.run(as_nobody(["sh", "-c", 'mv "$1/etc" "$1/etc.moved" && ln -s "$2" "$1/etc"',
                                             "sh", rootfs, victim]),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=10)
        ran = self.swap_between_layers(reg, img, rootfs, attack)
        code, out, err = self.main(*self.cli_args("--rootfs", rootfs, reg.host + "/swap/app:v1"))
        if ran.get("result") is not None:
            self.assertEqual(ran["result"].returncode, 0, "the attacker's step failed: %r" % ran["result"].stdout)
        self.assertVictimUnchanged(victim, before)
        self.assertEqual(code, 2, "a DIR owned by uid %d was accepted (exit %d): %s" % (NOBODY, code, err))
        self.assertOneErrorLine(err)
        self.assertIn(rootfs, err)
        self.assertRegex(err, r"own|other user|uid")
        self.assertEqual(reg.requests(kind="blobs"), [])  # refused before any download

    def test_rootfs_dir_writable_by_others_is_refused_up_front(self):
        """An existing empty --rootfs DIR that other users may write (0777) is refused up front (exit 2, says why)."""
        rootfs = os.path.join(self.home, "open")
        os.mkdir(rootfs)
        os.chmod(rootfs, 0o777)
        reg = self.registry()
        reg.push("swap/app", "v1", layered_image(*SWAP_LAYERS))
        code, out, err = self.main(*self.cli_args("--rootfs", rootfs, reg.host + "/swap/app:v1"))
        self.assertEqual(code, 2, "a DIR every user may write was accepted (exit %d): %s" % (code, err))
        self.assertOneErrorLine(err)
        self.assertIn(rootfs, err)
        self.assertRegex(err, r"writ")
        self.assertEqual(reg.requests(kind="blobs"), [])
        self.assertEqual(os.listdir(rootfs), [])

    def test_directory_swapped_for_a_symlink_between_layers_is_never_followed(self):
        """A directory of DIR replaced by a symlink to a host dir between layers: later entries and whiteouts
        never go through it."""
        rootfs = os.path.join(self.home, "mine")  # owned by the caller, 0755: accepted up front
        os.mkdir(rootfs, 0o755)
        victim = victim_dir(self)
        before = host_state(victim)
        reg = self.registry()
        img = reg.push("swap/app", "v1", layered_image(*SWAP_LAYERS))

        def attack():
            os.rename(os.path.join(rootfs, "etc"), os.path.join(rootfs, "etc.moved"))
            os.symlink(victim, os.path.join(rootfs, "etc"))
            return True
        ran = self.swap_between_layers(reg, img, rootfs, attack)
        code, out, err = self.main(*self.cli_args("--rootfs", rootfs, reg.host + "/swap/app:v1"))
        self.assertTrue(ran.get("result"), "layer 1 was never seen extracted: the swap did not happen")
        self.assertVictimUnchanged(victim, before)
        self.assertIn(code, (0, 5), err)  # applied inside DIR, or refused: never through the link
        self.assertNotIn("internal error", err)


class ReplacedDirectoryTests(TreeAssertions, Base):
    """A later entry replaces a directory (or a parent of one) whose mode, owner and times were
    left to apply at the end: with a symlink to a host directory, a whiteout, an opaque whiteout.
    Nothing on the host may change. tar_layer gives names starting with "owned" uid 1234, gid 5678,
    and every entry an mtime of 1600000000 + len(name). umoci 0.4.7 extracts every one of these
    images (metadata is applied inside the root), so registry_pull must succeed and match it."""

    def host_dir(self):
        host = tempfile.mkdtemp(prefix="rp-host-")
        self.addCleanup(shutil.rmtree, host, True)
        os.makedirs(os.path.join(host, "d"))
        with open(os.path.join(host, "secret"), "wb") as f:
            f.write(b"host secret\n")
        for path, mode in ((os.path.join(host, "secret"), 0o640), (os.path.join(host, "d"), 0o710), (host, 0o750)):
            os.chmod(path, mode)
            os.utime(path, ns=(1234567890123456789, 1234567890123456789))
        return host

    def assertHostUnchanged(self, host, before, who):
        after = host_state(host)
        changed = []
        for path in sorted(set(before) | set(after)):
            a, b = before.get(path) or {}, after.get(path) or {}
            if a != b:
                changed.append("%s: %s" % (path or ".", ", ".join("%s %s -> %s" % (k, a.get(k), b.get(k))
                                                                  for k in sorted(set(a) | set(b))
                                                                  if a.get(k) != b.get(k))))
        if changed:
            self.fail("%s changed the host directory %s through a symlink in the image:\n  %s"
                      % (who, host, "\n  ".join(changed)))

    def extract(self, layers, expect=None):
        """Pull an image of ``layers(host)`` (tar_layer entries) with --rootfs: the host directory
        stays as it was, the pull succeeds, and the tree is umoci's when umoci is installed."""
        host = self.host_dir()
        before = host_state(host)
        img = layered_image(*layers(host))
        reg = self.registry()
        reg.push("replaced/app", "v1", img)
        target = os.path.join(self.home, "rootfs")
        try:
            self.pull(reg, "replaced/app:v1", rootfs=target)
            error = None
        except rp.PullError as e:
            error = e
        self.assertHostUnchanged(host, before, "registry_pull")
        if error is not None:
            self.fail("registry_pull refused an image umoci extracts: %s (exit %d)" % (error, error.exit_code))
        if expect:
            expect(host, tree(target)[0])
        if UMOCI:
            layout = os.path.join(self.home, "layout")
            write_oci_layout(layout, "v1", [img])
            owners = os.geteuid() == 0
            theirs = self.umoci_tree(layout, "v1", os.path.join(self.home, "bundle"), owners)
            self.assertHostUnchanged(host, before, "umoci")
            self.assertSameTree(tree(target, owners), theirs)

    def test_parent_replaced_by_host_symlink_same_layer(self):
        # owned/secret: a directory (06777, 1234:5678) whose metadata waits for the end; then owned -> HOST.
        self.extract(lambda host: [[("owned", "dir", None, 0o755), ("owned/secret", "dir", None, 0o6777),
                                    ("owned", "symlink", host, 0o777)]],
                     lambda host, entries: self.assertEqual(entries, {"owned": dict(entries["owned"], target=host)}))

    def test_parent_replaced_by_host_symlink_next_layer(self):
        self.extract(lambda host: [[("owned", "dir", None, 0o755), ("owned/secret", "dir", None, 0o6777)],
                                   [("owned", "symlink", host, 0o777)]],
                     lambda host, entries: self.assertEqual(sorted(entries), ["owned"]))

    def test_parent_whited_out_then_host_symlink(self):
        # `rm -rf /owned && ln -s HOST /owned` as a whiteout followed by the symlink.
        self.extract(lambda host: [[("owned", "dir", None, 0o755), ("owned/secret", "dir", None, 0o6777),
                                    ("owned/d", "dir", None, 0o777)],
                                   [(".wh.owned", "file", b"", 0o644), ("owned", "symlink", host, 0o777)]])

    def test_opaque_grandparent_then_host_symlink(self):
        self.extract(lambda host: [[("owned", "dir", None, 0o755), ("owned/a", "dir", None, 0o755),
                                    ("owned/a/d", "dir", None, 0o777)],
                                   [("owned/.wh..wh..opq", "file", b"", 0o644), ("owned/a", "symlink", host, 0o777)]])

    def test_relative_symlinked_parent_replaced_by_host_symlink(self):
        # owned-l -> real inside the image, owned-l/d recorded through it; then real -> HOST.
        self.extract(lambda host: [[("real", "dir", None, 0o755), ("owned-l", "symlink", "real", 0o777),
                                    ("owned-l/d", "dir", None, 0o777)],
                                   [("real", "symlink", host, 0o777)]])

    def test_directory_itself_replaced_by_host_symlink(self):
        # owned/ (0777, 1234:5678, an mtime) replaced in the next layer by owned -> HOST/d.
        def expect(host, entries):
            self.assertEqual(entries["owned"]["target"], os.path.join(host, "d"))
        self.extract(lambda host: [[("owned", "dir", None, 0o777), ("owned/f", "file", b"in image", 0o644)],
                                   [("owned", "symlink", os.path.join(host, "d"), 0o777)]], expect)

    def test_host_symlink_then_entries_below_it(self):
        # owned -> HOST, then owned/secret and owned/d: resolved inside the root, as a chroot would.
        # HOST's components are directories of the image too: one made implicitly would get the
        # time of extraction, which differs between registry_pull and umoci.
        def layers(host):
            parts = host.strip("/").split("/")
            inner = [("/".join(parts[:i]), "dir", None, 0o755) for i in range(1, len(parts) + 1)]
            return [inner + [("owned", "dir", None, 0o777)], [("owned", "symlink", host, 0o777)],
                    [("owned/secret", "file", b"image bytes", 0o6777), ("owned/d", "dir", None, 0o777)]]

        def expect(host, entries):
            self.assertEqual(entries[host.strip("/") + "/secret"]["mode"], "6777")
            self.assertEqual(entries["owned"]["target"], host)
        self.extract(layers, expect)

    def test_opaque_whiteout_after_its_directory_entry(self):
        # What buildah's overlay driver (and Docker's overlay2) write for `rm -rf /x && mkdir /x`:
        # x/ first, then x/.wh..wh..opq, then the new children. x/sub/s (0700) is hidden with x/old.
        def expect(host, entries):
            self.assertEqual(sorted(p for p in entries if p.startswith("x/")), ["x/new"])
            self.assertEqual(entries["x"]["mode"], "0750")
        self.extract(lambda host: [[("x", "dir", None, 0o755), ("x/old", "file", b"o", 0o644),
                                    ("x/sub", "dir", None, 0o711), ("x/sub/s", "dir", None, 0o700),
                                    ("x/sub/s/f", "file", b"s", 0o644)],
                                   [("x", "dir", None, 0o750), ("x/.wh..wh..opq", "file", b"", 0o644),
                                    ("x/new", "file", b"n", 0o644)]], expect)


    def test_whiteout_of_a_tree_forgets_its_directories_and_only_those(self):
        # The extractor forgets exactly the directories a whiteout removed (not by a name
        # prefix scan): siblings that share a prefix keep their modes; the tree made again
        # in a later layer gets the new ones; nothing of the old tree is left behind.
        def expect(host, entries):
            self.assertEqual(sorted(p for p in entries if p == "c" or p.startswith("c/")), ["c", "c/sub"])
            self.assertEqual([entries[p]["mode"] for p in ("c", "c/sub", "cx", "c.d", "cx/sub")],
                             ["0750", "0705", "0701", "0702", "0703"])
        self.extract(lambda host: [[("c", "dir", None, 0o755), ("c/sub", "dir", None, 0o711),
                                    ("c/sub/s", "dir", None, 0o700), ("c/sub/s/f", "file", b"s", 0o644),
                                    ("cx", "dir", None, 0o701), ("cx/sub", "dir", None, 0o703),
                                    ("c.d", "dir", None, 0o702)],
                                   [(".wh.c", "file", b"", 0o644)],
                                   [("c", "dir", None, 0o750), ("c/sub", "dir", None, 0o705)]], expect)


class SparseMapTests(Base):
    """tarfile reads a sparse map whole, however many segments a tiny layer declares."""

    def test_huge_sparse_maps_are_hostile_and_memory_stays_low(self):
        """A GNU sparse 1.0 map or old GNU extension blocks with millions of segments: exit 5 (hostile), peak
        RSS < 100 MB."""
        reg = self.registry()
        cases = {"gnu-1.0": gnu_sparse_10_layer(1500000), "old-gnu": old_gnu_sparse_layer(60000)}
        for name, raw in cases.items():
            with self.subTest(case=name):
                img = reg.push("sparse/" + name, "v1", raw_image(raw))
                self.assertLess(len(img.layers[0]), 200000)  # a small layer
                target = os.path.join(self.home, "rootfs-" + name)
                code, out, err, peak, cpu = self.child(*self.cli_args("-q", "--rootfs", target,
                                                                      reg.host + "/sparse/%s:v1" % name), timeout=25)
                self.assertLess(peak, 100, "peak RSS %.0f MB for a %d-byte layer (exit %d, %.1f s CPU): %s"
                                % (peak, len(img.layers[0]), code, cpu, err.strip()))
                self.assertEqual(code, 5, err)
                self.assertIn("hostile", err)
                self.assertFalse(os.path.exists(target))


class DeepTreeTests(Base):
    """A few names thousands of levels deep."""

    def test_very_deep_name_is_hostile_and_leaves_nothing(self):
        """A 2,100-level name is refused as hostile (exit 5, not an internal error) and no directory is left behind."""
        reg = self.registry()
        reg.push("deep/2100", "v1", Image(layers=[deep_layer("d/" * 2100 + "f")]))
        parent = os.path.join(self.home, "out")
        os.mkdir(parent)
        target = os.path.join(parent, "rootfs")
        code, out, err, peak, cpu = self.child(*self.cli_args("-q", "--rootfs", target, reg.host + "/deep/2100:v1"))
        left = count_dirs(parent)
        said = "exit %d, %d directories left behind: %s" % (code, left, err.strip())
        self.assertNotIn("internal error", err, said)
        self.assertEqual(code, 5, said)
        self.assertIn("hostile", err)
        self.assertEqual(left, 0, said)

    def test_deep_names_cost_linear_time_or_are_refused(self):
        """Two names 1,900 levels deep end within 5 s of CPU: extracted in linear time, or refused as hostile
        (exit 5)."""
        reg = self.registry()
        img = reg.push("deep/1900", "v1", Image(layers=[deep_layer("a/" * 1900 + "f", "b/" * 1900 + "g")]))
        parent = os.path.join(self.home, "out")
        os.mkdir(parent)
        target = os.path.join(parent, "rootfs")
        code, out, err, peak, cpu = self.child(*self.cli_args("-q", "--rootfs", target, reg.host + "/deep/1900:v1"))
        self.assertLess(cpu, 5, "%.1f s of CPU for a %d-byte layer (exit %d)" % (cpu, len(img.layers[0]), code))
        self.assertIn(code, (0, 5), err)
        if code == 5:
            self.assertIn("hostile", err)
            self.assertEqual(os.listdir(parent), [])

    def test_ordinary_depth_is_still_extracted(self):
        """A 100-level name (deeper than any real image) is still extracted (exit 0)."""
        reg = self.registry()
        reg.push("deep/100", "v1", Image(layers=[deep_layer("d/" * 100 + "f")]))
        target = os.path.join(self.home, "rootfs")
        code, out, err = self.main(*self.cli_args("-q", "--rootfs", target, reg.host + "/deep/100:v1"))
        self.assertEqual(code, 0, err)
        self.assertTrue(os.path.isfile(os.path.join(target, "d/" * 100 + "f")))


def xattr_layer(entries):
    """A PAX tar layer of (name, type, mode, uid, gid, xattrs {name: bytes}, data or link target)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, mode, uid, gid, attrs, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, 1700000000
            info.pax_headers = dict(("SCHILY.xattr." + k, v.decode("utf-8", "surrogateescape"))
                                    for k, v in attrs.items() if not k.startswith("lib:"))
            info.pax_headers.update(("LIBARCHIVE.xattr." + urllib.parse.quote(k[4:]),
                                     base64.b64encode(v).decode().rstrip("=")) for k, v in attrs.items()
                                    if k.startswith("lib:"))
            if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
                info.linkname = data
                tar.addfile(info)
            elif kind in (tarfile.CHRTYPE, tarfile.FIFOTYPE):
                info.devmajor, info.devminor = (1, 3) if kind == tarfile.CHRTYPE else (0, 0)
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    raw = buf.getvalue()
    return gzip.compress(raw), sha256(raw)


CAP_NET_RAW = bytes.fromhex("0100000200200000000000000000000000000000")  # cap_net_raw+ep (vfs caps v2)
XATTR_ENTRIES = [
    ("bin", tarfile.DIRTYPE, 0o755, 0, 0, {"user.dir": b"d"}, None),
    ("bin/ping", tarfile.REGTYPE, 0o4755, 0, 0, {"security.capability": CAP_NET_RAW, "user.note": b"n1",
                                                 "trusted.overlay.opaque": b"y", "security.selinux": b"x"}, b"ELF"),
    ("bin/ping6", tarfile.LNKTYPE, 0o4755, 0, 0, {}, "bin/ping"),
    ("bin/lib", tarfile.REGTYPE, 0o644, 1000, 100, {"lib:user.from libarchive": b"\x00\xffbin"}, b"lib"),
    ("bin/sh", tarfile.SYMTYPE, 0o777, 0, 0, {}, "ping"),
    ("dev", tarfile.DIRTYPE, 0o755, 0, 0, {}, None),
    ("dev/null", tarfile.CHRTYPE, 0o666, 0, 0, {}, None),
    ("run/fifo", tarfile.FIFOTYPE, 0o620, 5, 6, {}, None),
    ("home/u", tarfile.DIRTYPE, 0o2750, 1000, 1000, {}, None),
]


class XattrTests(Base):
    """Extended attributes and ownership records in --rootfs."""

    def image(self, reg, entries=XATTR_ENTRIES):
        layer = xattr_layer(entries)
        return reg.push("x/app", "v1", Image(layers=[layer]))

    def test_as_root_every_namespace_but_the_hosts(self):
        if not IS_ROOT:
            self.skipTest("needs root")
        reg = self.registry()
        self.image(reg)
        root = os.path.join(self.home, "root")
        self.pull(reg, "x/app:v1", rootfs=root)
        ping = os.path.join(root, "bin", "ping")
        self.assertEqual(os.getxattr(ping, "security.capability"), CAP_NET_RAW)
        self.assertEqual(os.getxattr(ping, "user.note"), b"n1")
        self.assertNotIn("trusted.overlay.opaque", os.listxattr(ping))
        self.assertEqual(os.getxattr(os.path.join(root, "bin", "ping6"), "user.note"), b"n1")  # a hard link shares
        self.assertEqual(os.getxattr(os.path.join(root, "bin", "lib"), "user.from libarchive"), b"\x00\xffbin")
        self.assertEqual(os.getxattr(os.path.join(root, "bin"), "user.dir"), b"d")
        getcap = shutil.which("getcap")
        if getcap:
            out = subprocess.run([getcap, ping], stdout=subprocess.PIPE, check=True).stdout.decode()
            self.assertIn("cap_net_raw", out)

    def test_as_a_normal_user_user_attributes_and_one_warning(self):
        if not (IS_ROOT and SETPRIV):
            self.skipTest("needs root and setpriv to run as uid %d" % NOBODY)
        reg = self.registry()
        self.image(reg)
        home = tempfile.mkdtemp(prefix="rp-nobody-")
        self.addCleanup(shutil.rmtree, home, True)
        os.chown(home, NOBODY, NOBODY)
        root = os.path.join(home, "root")
        proc = subprocess.run(as_nobody([sys.executable, os.path.join(HERE, "registry_pull.py"), "--home", home,
                                         "--platform", "linux/amd64", "--rootfs", root, reg.host + "/x/app:v1"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              env=dict(os.environ, HOME=home, DOCKER_CONFIG=os.path.join(home, "no-docker")))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        ping = os.path.join(root, "bin", "ping")
        self.assertEqual(os.listxattr(ping), ["user.note"])
        warnings = [ln for ln in proc.stderr.decode().splitlines() if "extended attributes not kept" in ln]
        self.assertEqual(len(warnings), 1, proc.stderr)
        self.assertIn("security.capability on 1 file", warnings[0])

    def test_a_normal_user_extracts_into_directories_of_mode_0000_and_0555(self):
        """As uid 65534: a 0000 directory with a file and a subdirectory, a 0555 one, both filled
        by a later layer too, are extracted whole, the modes applied last; README's
        chmod -R u+rwX && rm -rf then deletes the tree as that user."""
        if not (IS_ROOT and SETPRIV):
            self.skipTest("needs root and setpriv to run as uid %d" % NOBODY)
        reg = self.registry()
        reg.push("x/closed", "v1", layered_image(
            [("shut", "dir", None, 0o000), ("shut/f", "file", b"inside", 0o644), ("shut/sub", "dir", None, 0o000),
             ("shut/sub/g", "file", b"deeper", 0o600), ("ro", "dir", None, 0o555), ("ro/f", "file", b"r", 0o444)],
            [("shut/later", "file", b"upper", 0o644), ("ro/later", "file", b"upper", 0o644)]))
        home = tempfile.mkdtemp(prefix="rp-nobody-")
        self.addCleanup(shutil.rmtree, home, True)
        os.chown(home, NOBODY, NOBODY)
        root = os.path.join(home, "root")
        proc = subprocess.run(as_nobody([sys.executable, os.path.join(HERE, "registry_pull.py"), "--home", home,
                                         "--platform", "linux/amd64", "--rootfs", root, reg.host + "/x/closed:v1"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              env=dict(os.environ, HOME=home, DOCKER_CONFIG=os.path.join(home, "no-docker")))
        self.assertEqual(proc.returncode, 0, proc.stderr)
        for path, mode in (("shut", 0o000), ("shut/sub", 0o000), ("ro", 0o555)):
            self.assertEqual(stat.S_IMODE(os.lstat(os.path.join(root, path)).st_mode), mode, path)
        for path, data in (("shut/f", b"inside"), ("shut/sub/g", b"deeper"), ("shut/later", b"upper"),
                           ("ro/f", b"r"), ("ro/later", b"upper")):
            with open(os.path.join(root, path), "rb") as f:  # (root reads through 0000)
                self.assertEqual(f.read(), data, path)
        proc = subprocess.run(as_nobody(["sh", "-c", 'chmod -R u+rwX "$1" && rm -rf "$1"', "sh", root]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertFalse(os.path.lexists(root))

    def test_owners_xattr_records_what_the_image_says(self):
        """--owners=xattr as uid 65534: each entry's user.containers.override_stat is the image's owner,
        mode and type (containers/storage's format); FIFOs and devices are empty files with theirs."""
        if not (IS_ROOT and SETPRIV):
            self.skipTest("needs root and setpriv to run as uid %d" % NOBODY)
        reg = self.registry()
        self.image(reg)
        home = tempfile.mkdtemp(prefix="rp-nobody-")
        self.addCleanup(shutil.rmtree, home, True)
        os.chown(home, NOBODY, NOBODY)
        root = os.path.join(home, "root")
        proc = subprocess.run(as_nobody([sys.executable, os.path.join(HERE, "registry_pull.py"), "--home", home,
                                         "--platform", "linux/amd64", "--owners", "xattr", "--rootfs", root,
                                         reg.host + "/x/app:v1"]),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60,
                              env=dict(os.environ, HOME=home, DOCKER_CONFIG=os.path.join(home, "no-docker")))
        self.assertEqual(proc.returncode, 0, proc.stderr)

        def record(*parts):
            return os.getxattr(os.path.join(root, *parts), "user.containers.override_stat").decode()
        self.assertEqual(record("bin", "ping"), "0:0:4755:file")
        self.assertEqual(record("bin", "lib"), "1000:100:0644:file")
        self.assertEqual(record("bin"), "0:0:0755:dir")
        self.assertEqual(record("home", "u"), "1000:1000:2750:dir")
        self.assertEqual(record("home"), "0:0:0755:dir")  # a parent the image never listed, as umoci makes it
        self.assertEqual(record("dev", "null"), "0:0:0666:char-1-3")
        self.assertEqual(record("run", "fifo"), "5:6:0620:pipe")
        self.assertTrue(stat.S_ISREG(os.lstat(os.path.join(root, "dev", "null")).st_mode))
        self.assertEqual(record(), "0:0:0755:dir")  # the root carries one: fuse-overlayfs reads them only then
        self.assertEqual(os.lstat(os.path.join(root, "bin", "ping")).st_uid, NOBODY)
        with self.assertRaises(OSError):
            os.getxattr(os.path.join(root, "bin", "sh"), "user.containers.override_stat", follow_symlinks=False)
        # fuse-overlayfs over that tree shows the image's owners and modes (xattr_permissions=2 reads
        # user.containers.override_stat), as a micro-VM's virtio-fs would.
        fuse = shutil.which("fuse-overlayfs")
        if not (fuse and os.path.exists("/dev/fuse")):
            return
        work = tempfile.mkdtemp(prefix="rp-fuse-")
        self.addCleanup(shutil.rmtree, work, True)
        for d in ("upper", "work", "mnt"):
            os.mkdir(os.path.join(work, d))
        mnt = os.path.join(work, "mnt")
        proc = subprocess.run([fuse, "-o", "lowerdir=%s,upperdir=%s/upper,workdir=%s/work,xattr_permissions=2"
                               % (root, work, work), mnt], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
        if proc.returncode != 0:
            return  # no FUSE in this sandbox: the records above are what it would read
        self.addCleanup(subprocess.call, ["fusermount", "-u", mnt], stderr=subprocess.DEVNULL)
        self.addCleanup(subprocess.call, ["umount", mnt], stderr=subprocess.DEVNULL)
        for parts, (uid, gid, mode) in ((("bin", "ping"), (0, 0, 0o4755)), (("bin", "lib"), (1000, 100, 0o644)),
                                        (("home", "u"), (1000, 1000, 0o2750)), ((), (0, 0, 0o755))):
            st = os.lstat(os.path.join(mnt, *parts))
            self.assertEqual((st.st_uid, st.st_gid, st.st_mode & 0o7777), (uid, gid, mode), parts)

    def test_as_root_the_same_attributes_as_umoci(self):
        """The attributes of --rootfs and of umoci unpack of the same image, entry by entry (both keep
        security.capability and user.*, neither trusted.overlay.* or security.selinux; umoci reads no
        LIBARCHIVE.xattr.* record)."""
        if not (IS_ROOT and UMOCI):
            self.skipTest("needs root and umoci")
        reg = self.registry()
        img = self.image(reg)
        root = os.path.join(self.home, "root")
        self.pull(reg, "x/app:v1", rootfs=root)
        layout = os.path.join(self.home, "layout")
        write_oci_layout(layout, "v1", [img])
        bundle = os.path.join(self.home, "bundle")
        proc = subprocess.run([UMOCI, "unpack", "--image", layout + ":v1", bundle], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)

        def attrs(top):
            found = {}
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    path = os.path.join(dirpath, name)
                    if os.path.islink(path):
                        continue
                    names = sorted(os.listxattr(path, follow_symlinks=False))
                    found[os.path.relpath(path, top)] = dict((n, os.getxattr(path, n, follow_symlinks=False))
                                                             for n in names)
            return found
        ours, theirs = attrs(root), attrs(os.path.join(bundle, "rootfs"))
        # Where umoci differs: Go's archive/tar reads SCHILY.xattr.* only, not libarchive's records.
        self.assertEqual(ours["bin/lib"].pop("user.from libarchive"), b"\x00\xffbin")
        self.assertEqual(ours, theirs)
        self.assertEqual(ours["bin/ping"]["security.capability"], CAP_NET_RAW)

    def test_a_huge_attribute_is_hostile(self):
        reg = self.registry()
        self.image(reg, [("f", tarfile.REGTYPE, 0o644, 0, 0, {"user.big": b"x" * 70000}, b"f")])
        code, out, err = self.main(*self.cli_args("--rootfs", os.path.join(self.home, "r"), reg.host + "/x/app:v1"))
        self.assertEqual(code, 5, err)
        self.assertFalse(os.path.exists(os.path.join(self.home, "r")))


# ROOTFS_LAYERS without the write through a lower layer's symlink (lib/libfoo.so), plus a hard link
# in an upper layer to a lower layer's file, and a directory replaced by a file.
FLAT_LAYERS = [ROOTFS_LAYERS[0] + [("d", "dir", None, 0o755), ("d/in", "file", b"gone", 0o644)],
               [e for e in ROOTFS_LAYERS[1] if e[0] != "lib/libfoo.so"] + [("a/up-link", "link", "owned", 0o640),
                                                                           ("d", "file", b"now a file", 0o600)],
               ROOTFS_LAYERS[2]]


class FlatTarTests(Base):
    """--tar: the final tree as one tar, streamed from the layers."""

    def test_plain_headers_are_written_as_tarfile_writes_them(self):
        """The flattener's one-go ustar header: for every entry that needs no PAX record it reads
        back (through tarfile) exactly as tarfile's own header does; anything else is left to it."""
        made = 0
        for name in ("a", "dir/sub/f", "d" * 100, "d" * 101, "caf\u00e9", "x/"):
            for kind in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE,
                         tarfile.FIFOTYPE):
                for extra in ({}, {"uid": 8 ** 7}, {"size": 8 ** 11 - 1, "mtime": 1.5}, {"uname": "u" * 33},
                              {"linkname": "t" * 100, "devmajor": 8, "devminor": 2 ** 21},
                              {"pax_headers": {"SCHILY.xattr.user.a": "b"}}, {"mode": 0o107777, "gid": 65534}):
                    info = tarfile.TarInfo(name)
                    info.type, info.mode, info.mtime, info.uname, info.gname = kind, 0o4755, 1700000000, "root", "g"
                    for k, v in extra.items():
                        setattr(info, k, v)
                    ours = rp._ustar_header(info)
                    try:
                        theirs = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                    except ValueError:  # tarfile cannot write it: nor may this (but a non-device's
                        if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):  # device numbers: 3.8 writes them)
                            self.assertIsNone(ours)
                        continue
                    with self.subTest(name=name, kind=kind, extra=extra):
                        if ours is None:
                            continue
                        made += 1
                        self.assertEqual(len(ours), 512)
                        self.assertEqual(len(theirs), 512)  # tarfile needed no PAX record either
                        # The same fields, each header's own checksum right (3.8 writes a non-device's
                        # device numbers as zeros, later versions leave them empty: the sums differ).
                        mine, tarfiles = parsed_header(tarfile.TarInfo, ours), parsed_header(tarfile.TarInfo, theirs)
                        self.assertNotIsInstance(mine, str)
                        self.assertEqual(mine[:6] + mine[7:], tarfiles[:6] + tarfiles[7:])
                        self.assertEqual(ours[:148] + ours[156:329], theirs[:148] + theirs[156:329])
        self.assertGreater(made, 40)

    def extract(self, tar_path):
        return gnu_tar_extract(self, tar_path)

    def test_the_tar_gives_the_rootfs_tree(self):
        if not IS_ROOT or not shutil.which("tar"):
            self.skipTest("needs root (owners) and GNU tar")
        reg = self.registry()
        reg.push("flat/app", "v1", layered_image(*FLAT_LAYERS))
        root, flat = os.path.join(self.home, "root"), os.path.join(self.home, "flat.tar")
        self.pull(reg, "flat/app:v1", rootfs=root, tar=flat)
        self.assertEqual(tree(self.extract(flat)), tree(root))
        with tarfile.open(flat) as tar:
            names = tar.getnames()
        self.assertEqual(len(names), len(set(names)))  # each name once
        self.assertFalse([n for n in names if ".wh." in n])
        again = os.path.join(self.home, "again.tar")
        self.pull(reg, "flat/app:v1", tar=again)
        with open(flat, "rb") as a, open(again, "rb") as b:
            self.assertEqual(a.read(), b.read())  # a stable order: the same bytes each time
        code, out, err = self.main(*self.cli_args("--tar", flat, reg.host + "/flat/app:v1"))
        self.assertEqual(code, 2, err)  # an existing file is refused

    def test_xattrs_and_owners_travel_in_pax_records(self):
        if not shutil.which("tar"):
            self.skipTest("needs GNU tar")
        reg = self.registry()
        reg.push("x/app", "v1", Image(layers=[xattr_layer(XATTR_ENTRIES)]))
        proc = subprocess.run([sys.executable, os.path.join(HERE, "registry_pull.py"), *self.cli_args(
            "-q", "--tar", "-", reg.host + "/x/app:v1")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:  # nothing but the tar on standard output
            ping = tar.getmember("bin/ping")
            lib = tar.getmember("bin/lib")
            self.assertEqual(ping.pax_headers["SCHILY.xattr.security.capability"].encode("utf-8", "surrogateescape"),
                             CAP_NET_RAW)
            self.assertEqual((lib.uid, lib.gid, ping.mode), (1000, 100, 0o4755))
            self.assertTrue(tar.getmember("dev/null").ischr())
            self.assertTrue(tar.getmember("bin/ping6").islnk())

    def test_corner_stacks_give_the_rootfs_tree(self):
        """Shapes a differential fuzz of --tar against --rootfs found: a middle layer's file or
        link under an upper layer's directory of the same name hides what is below it; an opaque
        root hides every lower entry."""
        if not IS_ROOT or not shutil.which("tar"):
            self.skipTest("needs root (owners) and GNU tar")
        stacks = {
            "middle link": [[("a", "dir", None, 0o755), ("a/d", "dir", None, 0o755), ("a/d/f", "file", b"0", 0o644)],
                            [("a", "symlink", "missing", 0o777)],
                            [("a", "dir", None, 0o755), ("a/new", "file", b"2", 0o644)]],
            "middle file": [[("b", "dir", None, 0o755), ("b/e", "file", b"0", 0o644)],
                            [("b", "file", b"1", 0o644)],
                            [("b", "dir", None, 0o755)]],
            "opaque root": [[("b", "dir", None, 0o755), ("b/d", "file", b"0", 0o644), ("top", "file", b"0", 0o644)],
                            [(".wh..wh..opq", "file", b"", 0o644), ("kept", "file", b"1", 0o644)]],
            # A hard link names the inode its target was when the link was made, not the file an
            # upper layer (or the link's own, after it) later put under that name.
            "link, then its target replaced in its layer": [
                [("f", "dir", None, 0o755), ("f/e", "file", b"lower", 0o640)],
                [("c", "link", "f/e", 0o640), ("f/e", "file", b"upper", 0o644)]],
            "links, then their target replaced above": [
                [("a", "file", b"lower", 0o600), ("z", "file", b"z", 0o644)],
                [("b", "link", "a", 0o600), ("sub", "dir", None, 0o755), ("sub/c", "link", "a", 0o600)],
                [("a", "file", b"upper", 0o644)]],
            "whiteout and opaque marker of one name": [
                [("b", "dir", None, 0o755), ("b/f", "dir", None, 0o755), ("b/f/x", "file", b"0", 0o644)],
                [("b/f/.wh..wh..opq", "file", b"", 0o644), ("b/.wh.f", "file", b"", 0o644)]],
            "a link in the lower layer too": [
                [("a", "file", b"lower", 0o600), ("a2", "link", "a", 0o600)],
                [("b", "link", "a", 0o600)],
                [("a", "file", b"upper", 0o644)]],
            # Links whose targets are links left for the end too: each written after its target.
            "a link to a link to a lower file": [
                [("y", "file", b"y", 0o644)], [("x", "link", "y", 0o644)], [("l", "link", "x", 0o644)]],
            # The lower entry of a replaced target is itself a hard link: the links made to it
            # are links to its inode (u's), not to the file above.
            "the replaced target was a link": [
                [("u", "file", b"lower", 0o600), ("t", "link", "u", 0o600)],
                [("m", "link", "t", 0o600)],
                [("t", "file", b"upper", 0o644), ("l", "link", "m", 0o600)]],
            # A link to a link of its own layer that waits for its target: written after it.
            "a link to a waiting link of its layer": [
                [("b", "file", b"b", 0o644)], [("x", "link", "b", 0o644), ("y", "link", "x", 0o644)]],
            "a link to a link waiting for a replaced file": [
                [("b", "file", b"lower", 0o644)], [("x", "link", "b", 0o644), ("y", "link", "x", 0o644)],
                [("b", "file", b"upper", 0o600)]],
            # Parents no layer lists stay when all below them is hidden (--rootfs made them).
            "all below implicit parents whited out": [
                [("a/b/f", "file", b"0", 0o644)], [("a/b/.wh.f", "file", b"", 0o644)]],
            "an implicit directory made opaque": [
                [("c/d/e", "file", b"0", 0o644)], [("c/d/.wh..wh..opq", "file", b"", 0o644)]],
            # A whiteout below an upper layer's opaque marker of the same name still hides the
            # lower directory itself (its mode, not only its contents).
            "a whiteout below an opaque marker": [
                [("a", "dir", None, 0o700), ("a/x", "file", b"0", 0o644)], [(".wh.a", "file", b"", 0o644)],
                [("a/.wh..wh..opq", "file", b"", 0o644), ("a/y", "file", b"1", 0o644)]],
            # A link keeps the inode an upper layer whites out the name of (or hides, opaque).
            "a link to a file whited out above": [
                [("t", "file", b"t", 0o640), ("d", "dir", None, 0o755), ("d/u", "file", b"u", 0o600)],
                [("l", "link", "t", 0o640), ("m", "link", "d/u", 0o600)],
                [(".wh.t", "file", b"", 0o644), ("d/.wh..wh..opq", "file", b"", 0o644)]],
            # The same name twice in one layer: the later entry wins (as tar -x gives it).
            "a name twice in a layer": [
                [("o", "file", b"lower", 0o644)],
                [("d", "dir", None, 0o700), ("f", "file", b"first", 0o600), ("s", "symlink", "f", 0o777),
                 ("o", "file", b"first", 0o600), ("d", "dir", None, 0o750), ("f", "file", b"second", 0o644),
                 ("s", "file", b"now a file", 0o640), ("o", "link", "f", 0o644)]],
            "an implicit parent that a lower layer lists": [
                [("a", "dir", None, 0o700)], [("a/b/f", "file", b"0", 0o644)], [("a/b/.wh.f", "file", b"", 0o644)]],
        }
        reg = self.registry()
        for i, (what, layers) in enumerate(stacks.items()):
            with self.subTest(stack=what):
                reg.push("flat/corner%d" % i, "v1", layered_image(*layers))
                root, flat = os.path.join(self.home, "root%d" % i), os.path.join(self.home, "flat%d.tar" % i)
                self.pull(reg, "flat/corner%d:v1" % i, rootfs=root, tar=flat)
                # (a parent no layer lists is made when each extraction runs: its time is not compared)
                self.assertEqual(untimed_dirs(tree(self.extract(flat))), untimed_dirs(tree(root)))

    def test_a_parent_kept_for_hidden_entries_has_their_time_not_the_pulls(self):
        """The tar is the same bytes every time: a directory kept only as the parent of entries
        an upper layer hides takes the hidden entry's time, not the clock's."""
        reg = self.registry()
        reg.push("flat/implied", "v1", layered_image([("a/b/f", "file", b"0", 0o644)],
                                                     [("a/b/.wh.f", "file", b"", 0o644)]))
        flat = os.path.join(self.home, "implied.tar")
        self.pull(reg, "flat/implied:v1", tar=flat)
        with tarfile.open(flat) as tar:
            members = dict((m.name, m) for m in tar.getmembers())
        self.assertEqual(sorted(members), ["a", "a/b"])
        for name in ("a", "a/b"):
            self.assertTrue(members[name].isdir())
            self.assertEqual(members[name].mtime, 1600000000 + len("a/b/f"))

    def test_a_link_to_a_link_that_waits_for_the_end_follows_it(self):
        """A hard link whose lower target never comes by is linked at the end to the file that
        holds the name (a layer --rootfs refuses); a link to that link comes after it, so GNU
        tar extracts the tar (a link before its target fails: "Cannot hard link")."""
        if not IS_ROOT or not shutil.which("tar"):
            self.skipTest("needs root (owners) and GNU tar")
        reg = self.registry()
        reg.push("flat/late", "v1", layered_image(
            [("z", "file", b"z", 0o644)], [("m", "link", "t", 0o600)],
            [("t", "file", b"upper", 0o644), ("l", "link", "m", 0o600)]))
        flat = os.path.join(self.home, "late.tar")
        self.pull(reg, "flat/late:v1", tar=flat)
        with tarfile.open(flat) as tar:
            order = [m.name for m in tar.getmembers()]
        self.assertLess(order.index("m"), order.index("l"))
        entries, groups = tree(gnu_tar_extract(self, flat))
        self.assertEqual(sorted(entries), ["l", "m", "t", "z"])
        self.assertEqual(groups, [["l", "m", "t"]])

    def test_what_a_layer_puts_below_its_own_new_file_is_not_written(self):
        """The flattener remembers the directories it found visible for the rest of a layer;
        a file the same layer then puts at such a name hides what follows below it. A layer that
        wrote below the name first cannot be flattened (tar -x cannot make the file then): refused."""
        reg = self.registry()
        reg.push("flat/own", "v1", layered_image(
            [("q/keep", "file", b"k", 0o644), ("q/r/s1", "file", b"1", 0o644)],
            [("top", "file", b"t", 0o644), ("q/r", "file", b"now a file", 0o644), ("q/r/s2", "file", b"2", 0o644)]))
        flat = os.path.join(self.home, "own.tar")
        self.pull(reg, "flat/own:v1", tar=flat)
        with tarfile.open(flat) as tar:
            members = dict((m.name, m) for m in tar.getmembers())
        self.assertTrue(members["q/r"].isreg())
        self.assertNotIn("q/r/s2", members)
        self.assertNotIn("q/r/s1", members)  # the lower layer's, below the upper layer's file
        self.assertIn("q/keep", members)
        for i, (first, then) in enumerate(((("q/r/s0", "file", b"0", 0o644), ("q/r", "file", b"f", 0o644)),
                                           (("d", "dir", None, 0o755), ("d/x", "file", b"x", 0o644)))):
            layers = [[("q/keep", "file", b"k", 0o644)], [first, then] + ([("d", "symlink", "q", 0o777)] if i else [])]
            reg.push("flat/contra%d" % i, "v1", layered_image(*layers))
            path = os.path.join(self.home, "contra%d.tar" % i)
            code, out, err = self.main(*self.cli_args("--tar", path, reg.host + "/flat/contra%d:v1" % i))
            self.assertEqual(code, 1, err)
            self.assertIn("cannot flatten", err)
            self.assertFalse(os.path.exists(path))

    def test_a_name_a_layer_lists_as_a_file_and_then_a_directory_is_the_directory(self):
        """The later entry of a name wins within a layer, a file over its directory (nothing
        below it yet) or a directory over its file: GNU tar's extraction is the --rootfs tree."""
        if not IS_ROOT or not shutil.which("tar"):
            self.skipTest("needs root (owners) and GNU tar")
        reg = self.registry()
        layers = [[("a", "dir", None, 0o700), ("a/lower", "file", b"0", 0o644), ("b", "dir", None, 0o755),
                   ("b/lower", "file", b"0", 0o644)],
                  [("a", "file", b"first", 0o644), ("a", "dir", None, 0o750), ("a/new", "file", b"n", 0o600),
                   ("b", "dir", None, 0o711), ("b", "file", b"now a file", 0o640)]]
        reg.push("flat/both", "v1", layered_image(*layers))
        root, flat = os.path.join(self.home, "both"), os.path.join(self.home, "both.tar")
        self.pull(reg, "flat/both:v1", rootfs=root, tar=flat)
        entries, _ = tree(root)
        self.assertEqual(dict((k, (e["type"], e.get("mode"))) for k, e in entries.items()),
                         {"a": ("dir", "0750"), "a/new": ("file", "0600"), "b": ("file", "0640")})
        self.assertEqual(untimed_dirs(tree(gnu_tar_extract(self, flat))), untimed_dirs(tree(root)))

    def test_what_rootfs_refuses_as_hostile_tar_refuses_too(self):
        """What --rootfs refuses as hostile (exit 5), --tar refuses too, and no file is left, not
        a tar that GNU tar cannot extract or one with a link left out: a hard link to a directory
        (hostile: exit 5), to nothing (exit 1: --tar cannot tell nothing from an inode an upper
        layer replaced). An upper layer's entry below a lower file, which --rootfs refuses, --tar
        writes as overlayfs shows it: the upper directory hides the file."""
        reg = self.registry()
        stacks = {"link to a directory": ([[("a", "dir", None, 0o755), ("b", "link", "a", 0o644)]], 5),
                  "link to nothing, through a link": (
                      [[("x", "link", "missing", 0o644), ("y", "link", "x", 0o644)]], 1),
                  "link to nothing": ([[("f", "file", b"f", 0o644)], [("x", "link", "missing", 0o644)]], 1),
                  "below a lower file": ([[("a", "file", b"a", 0o644)], [("a/b", "file", b"b", 0o644)]], 0)}
        for i, (what, (layers, tar_code)) in enumerate(stacks.items()):
            with self.subTest(stack=what):
                reg.push("flat/hostile%d" % i, "v1", layered_image(*layers))
                flat, root = os.path.join(self.home, "hostile%d.tar" % i), os.path.join(self.home, "root%d" % i)
                code, out, err = self.main(*self.cli_args("--rootfs", root, reg.host + "/flat/hostile%d:v1" % i))
                self.assertEqual(code, 5, err)
                self.assertIn("hostile", err)
                self.assertFalse(os.path.exists(root))
                code, out, err = self.main(*self.cli_args("--tar", flat, reg.host + "/flat/hostile%d:v1" % i))
                self.assertEqual(code, tar_code, err)
                if tar_code:
                    self.assertIn("hostile" if tar_code == 5 else "cannot flatten", err)
                    self.assertFalse(os.path.exists(flat))
                elif IS_ROOT and shutil.which("tar"):
                    entries, _ = tree(gnu_tar_extract(self, flat))
                    self.assertEqual(dict((k, e["type"]) for k, e in entries.items()), {"a": "dir", "a/b": "file"})

    def test_a_write_through_a_lower_symlink_is_refused_not_flattened_wrong(self):
        reg = self.registry()
        reg.push("flat/app", "v1", layered_image(*ROOTFS_LAYERS))
        flat = os.path.join(self.home, "flat.tar")
        code, out, err = self.main(*self.cli_args("--tar", flat, reg.host + "/flat/app:v1"))
        self.assertEqual(code, 1, err)
        self.assertIn("symbolic link", err)
        self.assertFalse(os.path.exists(flat))
        # Through a link of the entry's own layer: refused too (it was left out without a word).
        reg.push("flat/own-link", "v1", layered_image([("t", "dir", None, 0o755)],
                                                      [("a", "symlink", "t", 0o777), ("a/b/c", "file", b"c", 0o644)]))
        code, out, err = self.main(*self.cli_args("--tar", flat, reg.host + "/flat/own-link:v1"))
        self.assertEqual(code, 1, err)
        self.assertIn("own symbolic link a", err)
        self.assertFalse(os.path.exists(flat))


# --------------------------------------------------------------------------- outputs


class OutputTests(Base):
    def pull_with(self, reg, ref, **kw):
        return self.pull(reg, ref, **kw)

    def test_store_is_oci_layout(self):
        reg = self.registry()
        a = reg.push("lay/a", "v1", Image())
        b = reg.push("lay/b", "v2", Image("arm64", "v8"))
        self.pull(reg, "lay/a:v1")
        self.pull(reg, "lay/b:v2", platform="linux/arm64")
        with open(os.path.join(self.home, "oci-layout")) as f:
            self.assertEqual(json.load(f), {"imageLayoutVersion": "1.0.0"})
        with open(os.path.join(self.home, "index.json")) as f:
            index = json.load(f)
        refs = dict((m["annotations"]["org.opencontainers.image.ref.name"], m) for m in index["manifests"])
        self.assertEqual(set(refs), {reg.host + "/lay/a:v1", reg.host + "/lay/b:v2"})
        self.assertEqual(refs[reg.host + "/lay/b:v2"]["digest"], b.digest)
        self.assertEqual(refs[reg.host + "/lay/b:v2"]["platform"], {"os": "linux", "architecture": "arm64",
                                                                     "variant": "v8"})
        self.assertEqual(refs[reg.host + "/lay/a:v1"]["size"], len(a.manifest))

    def test_oci_layout_export_adds_to_existing(self):
        reg = self.registry()
        a = reg.push("exp/a", "v1", Image())
        b = reg.push("exp/b", "v2", Image())
        layout = os.path.join(self.home, "layout")
        self.pull(reg, "exp/a:v1", oci_layout=layout)
        self.pull(reg, "exp/b:v2", oci_layout=layout + ":custom")
        with open(os.path.join(layout, "index.json")) as f:
            index = json.load(f)
        names = dict((m["annotations"]["org.opencontainers.image.ref.name"], m["digest"]) for m in index["manifests"])
        self.assertEqual(names, {"v1": a.digest, "custom": b.digest})
        for img in (a, b):
            for digest in list(img.blobs()) + [img.digest]:
                path = os.path.join(layout, "blobs", "sha256", digest.split(":")[1])
                store_path = os.path.join(self.home, "blobs", "sha256", digest.split(":")[1])
                self.assertEqual(os.stat(path).st_ino, os.stat(store_path).st_ino)  # hard linked

    def test_an_existing_layout_blob_is_checked_not_trusted_by_name(self):
        """A blob already in the output layout under the right name but with other bytes (of
        the same size too) is replaced by the store's; one that is the store's file or the same
        bytes is kept as it is."""
        reg = self.registry()
        img = reg.push("exp/c", "v1", Image())
        layout = os.path.join(self.home, "layout")
        self.pull(reg, "exp/c:v1", oci_layout=layout)
        digests = [sha256(b) for b in img.layers + [img.config]]
        layers = [os.path.join(layout, "blobs", "sha256", d.split(":")[1]) for d in digests]
        wrong_size, same_size, copied = layers[0], layers[1], layers[-1]
        os.unlink(wrong_size)
        with open(wrong_size, "wb") as f:
            f.write(b"planted")
        with open(same_size, "rb") as f:
            size = len(f.read())
        os.unlink(same_size)
        with open(same_size, "wb") as f:
            f.write(b"x" * size)
        with open(copied, "rb") as f:
            data = f.read()
        os.unlink(copied)
        with open(copied, "wb") as f:
            f.write(data)
        copied_ino = os.stat(copied).st_ino
        self.pull(reg, "exp/c:v1", oci_layout=layout)
        for path, digest in zip(layers, digests):
            with open(path, "rb") as f:
                self.assertEqual("sha256:" + hashlib.sha256(f.read()).hexdigest(), digest)
        self.assertEqual(os.stat(copied).st_ino, copied_ino)  # the same bytes: kept, not rewritten

    def test_docker_archive(self):
        reg = self.registry()
        img = reg.push("arch/app", "v3", Image())
        path = os.path.join(self.home, "image.tar")
        self.pull(reg, "arch/app:v3", docker_archive=path)
        with tarfile.open(path) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
            self.assertEqual(manifest[0]["RepoTags"], [reg.host + "/arch/app:v3"])
            cfg = tar.extractfile(manifest[0]["Config"]).read()
            self.assertEqual(cfg, img.config)
            self.assertEqual([tar.extractfile(x).read() for x in manifest[0]["Layers"]], img.layers)
        self.assertEqual([x for x in os.listdir(self.home) if x.startswith(".tmp")], [])


class OciLayoutTemporaryTests(Base):
    """Blobs copied into the layout through BLOB.tmp-PID, a name anyone can predict."""

    def test_an_existing_index_that_is_no_index_is_refused_and_kept(self):
        """An existing layout's index.json of the wrong shape (deep, manifests not a list) or no
        file at all (a FIFO would hang the open) is refused with exit 7 and left as it is."""
        reg = self.registry()
        reg.push("lay/idx", "v1", Image())
        cases = {"deep": b"[" * 100000 + b"]" * 100000, "int": b'{"manifests": 5}',
                 "dict": b'{"manifests": {"a": {"digest": "x"}}}', "fifo": None}
        for what, content in cases.items():
            with self.subTest(index=what):
                layout = os.path.join(self.home, "L-" + what)
                os.makedirs(layout)
                index = os.path.join(layout, "index.json")
                if content is None:
                    os.mkfifo(index)
                else:
                    with open(index, "wb") as f:
                        f.write(content)
                code, _, err = self.main(*self.cli_args("--oci-layout", layout, reg.host + "/lay/idx:v1"))
                self.assertEqual(code, 7, err)
                self.assertIn("is not a valid OCI index: refusing to overwrite it", err)
                if content is None:
                    self.assertTrue(stat.S_ISFIFO(os.lstat(index).st_mode))
                else:
                    with open(index, "rb") as f:
                        self.assertEqual(f.read(), content)

    def test_a_layout_locked_by_another_process_ends_at_the_timeout(self):
        """The layout's lock is waited for (another writer finishing), but --timeout still ends
        the wait: exit 6 and the index as it was, not a pull that never returns."""
        if rp._fcntl is None:
            self.skipTest("no flock here")
        reg = self.registry()
        reg.push("lock/app", "v1", Image())
        layout = os.path.join(self.home, "locked")
        os.makedirs(layout)
        fd = os.open(layout, os.O_RDONLY)
        self.addCleanup(os.close, fd)
        rp._fcntl.flock(fd, rp._fcntl.LOCK_EX)
        started = time.monotonic()
        with self.assertRaises(rp.RegistryError) as cm:
            self.pull(reg, "lock/app:v1", oci_layout=layout, timeout=2)
        self.assertIn("timeout", str(cm.exception))
        self.assertLess(time.monotonic() - started, 30)
        self.assertEqual(cm.exception.exit_code, 6)
        self.assertFalse(os.path.exists(os.path.join(layout, "index.json")))

    def test_oci_layout_never_writes_through_a_planted_temporary_link(self):
        """Symlinks planted (and re-planted) at BLOB.tmp-PID in the layout never make the export write the
        victim file."""
        reg = self.registry()
        img = reg.push("lay/app", "v1", Image())
        self.pull(reg, "lay/app:v1")  # the store is warm: each pull below only exports
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        work = tempfile.mkdtemp(prefix="rp-layout-", dir=base)  # another file system: blobs are copied
        self.addCleanup(subprocess.call, ["rm", "-rf", work])
        copied = os.stat(work).st_dev != os.stat(self.home).st_dev
        layout = os.path.join(work, "layout")
        blobs = os.path.join(layout, "blobs", "sha256")
        os.makedirs(blobs)
        victim = os.path.join(victim_dir(self), "passwd")
        with open(victim, "rb") as f:
            original = f.read()
        names = [os.path.join(blobs, "%s.tmp-%d" % (d.split(":")[1], os.getpid()))
                 for d in [img.digest] + list(img.blobs())]
        for name in names:
            os.symlink(victim, name)
        stop = os.path.join(work, "stop")
        # The attacker (uid 65534 when we are root: it made the layout directory) keeps planting.
        planter = [sys.executable, "-c",
                   "import os, sys\n"
                   "victim, stop, names = sys.argv[1], sys.argv[2], sys.argv[3:]\n"
                   "while not os.path.exists(stop):\n"
                   "    for n in names:\n"
                   "        try:\n"
                   "            os.symlink(victim, n)\n"
                   "        except OSError:\n"
                   "            pass\n", victim, stop] + names
        if IS_ROOT and SETPRIV:
            os.chmod(work, 0o755)
            subprocess.check_call(["chown", "-R", "%d:%d" % (NOBODY, NOBODY), layout])
            planter = as_nobody(planter)
        proc = subprocess.Popen(planter)
        self.addCleanup(end_process, proc)
        self.addCleanup(lambda: open(stop, "w").close())
        time.sleep(0.2)
        deadline = time.monotonic() + 8
        tries = 0
        while time.monotonic() < deadline and tries < 25:
            tries += 1
            try:
                self.pull(reg, "lay/app:v1", oci_layout=layout)
            except rp.PullError:
                pass  # refusing is fine; writing the victim is not
            with open(victim, "rb") as f:
                now = f.read()
            if now != original:
                self.fail("export %d (%s) wrote the victim file through a planted BLOB.tmp-%d link: it now "
                          "holds %d bytes starting %r" % (tries, "copied: another file system" if copied
                                                          else "linked", os.getpid(), len(now), now[:8]))
            for name in os.listdir(blobs):  # export again next time
                if not name.endswith(".tmp-%d" % os.getpid()):
                    os.unlink(os.path.join(blobs, name))
        self.assertEqual(os.stat(victim).st_nlink, 1)


class PlatformAllLayoutTests(Base):
    """`pull --platform all --oci-layout DIR` puts every entry of the index, as listed, in DIR."""

    def layout_has(self, layout, digests):
        missing = [d for d in digests if not os.path.exists(os.path.join(layout, "blobs", "sha256", d.split(":")[1]))]
        self.assertEqual(missing, [], "missing from the layout")

    def test_two_entries_for_one_platform_are_both_pulled(self):
        """Two linux/amd64 entries (e.g. gzip and zstd variants): both manifests and their blobs reach the layout."""
        reg = self.registry()
        gz = Image(layers=[make_layer({"v": b"gzip variant"})])
        other = Image(layers=[make_layer({"v": b"second variant, another digest"})])
        reg.push_index("dup/app", "v1", [gz, other], attestations=False)
        layout = os.path.join(self.home, "layout")
        code, out, err = self.main("pull", "--home", self.home, "--platform", "all", "--oci-layout", layout,
                                   reg.host + "/dup/app:v1")
        self.assertEqual(code, 0, err)
        self.layout_has(layout, [other.digest] + list(other.blobs()))
        self.layout_has(layout, [gz.digest] + list(gz.blobs()))

    def test_nested_index_is_exported_with_its_images(self):
        """index -> index -> manifest: the nested index's own blob and the image's blobs reach the layout."""
        for plat in ({"os": "linux", "architecture": "amd64"}, None):
            with self.subTest(nested_entry_platform=plat):
                reg = self.registry()
                img = reg.push("nest/app", None, Image(layers=[make_layer({"n": repr(plat).encode()})]))
                nested = make_index([img], attestations=False)
                reg.manifests[("nest/app", sha256(nested))] = (OCI["index"], nested)
                entry = {"mediaType": OCI["index"], "digest": sha256(nested), "size": len(nested)}
                if plat:
                    entry["platform"] = plat
                top = json.dumps({"schemaVersion": 2, "mediaType": OCI["index"], "manifests": [entry]}).encode()
                reg.manifests[("nest/app", "v1")] = (OCI["index"], top)
                layout = os.path.join(self.home, "layout-%s" % bool(plat))
                code, out, err = self.main("pull", "--home", self.home, "--platform", "all", "--oci-layout", layout,
                                           reg.host + "/nest/app:v1")
                self.assertEqual(code, 0, err)
                self.layout_has(layout, [sha256(top), sha256(nested), img.digest] + list(img.blobs()))


class DockerArchiveTargetTests(Base):
    """--docker-archive FILE neither clobbers a file nor fails as a bug."""

    def test_existing_file_is_not_overwritten(self):
        """An existing --docker-archive FILE is refused (exit 2 or 7, a message) and left as it was."""
        reg = self.registry()
        reg.push("arc/app", "v1", Image())
        path = os.path.join(self.home, "precious.tar")
        with open(path, "wb") as f:
            f.write(b"precious")
        code, out, err = self.main(*self.cli_args("--docker-archive", path, reg.host + "/arc/app:v1"))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), b"precious", "the file was overwritten")
        self.assertIn(code, (2, 7), err)
        self.assertIn(path, err)

    def test_missing_directory_is_a_storage_error(self):
        """--docker-archive in a directory that does not exist: exit 7 and one error line, not an internal error."""
        reg = self.registry()
        reg.push("arc/app", "v1", Image())
        path = os.path.join(self.home, "missing", "img.tar")
        code, out, err = self.main(*self.cli_args("--progress", "none", "--docker-archive", path,
                                                  reg.host + "/arc/app:v1"))
        self.assertEqual(code, 7, err)
        self.assertOneErrorLine(err)


class CopyTests(Base):
    """copy SRC DST: an image or an index from a registry or an OCI layout into a registry, pushed as the
    distribution spec says (HEAD, mount or POST, PUT or PATCH chunks, manifests children first)."""

    KEYS = {"source", "destination", "digest", "uploaded", "mounted", "skipped"}

    def two(self):
        return self.registry(per_repo=True), self.registry(per_repo=True)

    def copy(self, src, dst, **kw):
        kw.setdefault("home", self.home)
        return rp.copy(src, dst, **kw)

    def big_image(self, size=300000):
        return Image(layers=[make_layer({"data/big": os.urandom(size)})])

    def patches(self, reg):
        return [headers_of(h) for m, p, h in reg.log if m == "PATCH"]

    def blob_puts(self, reg, digest):
        return [headers_of(h) for m, p, h in reg.uploads_of(digest) if m == "PUT"]

    def test_copy_between_registries_uploads_every_blob_and_the_exact_manifest(self):
        a, b = self.two()
        img = a.push("src/app", "v1", Image())
        res = self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1")
        self.assertEqual(set(res), self.KEYS)
        self.assertEqual(res["digest"], img.digest)
        self.assertIn("dst/app", res["destination"])
        self.assertIn("src/app", res["source"])
        self.assertEqual(b.manifests[("dst/app", "v1")], (rp.MT_OCI_MANIFEST, img.manifest))
        self.assertEqual(sorted(res["uploaded"]), sorted(img.blobs()))
        self.assertEqual((res["mounted"], res["skipped"]), ([], []))
        self.assertEqual(sorted(d for r, d in b.uploaded if r == "dst/app"), sorted(img.blobs()))
        for digest, data in img.blobs().items():
            self.assertEqual(b.blobs[digest], data)
            self.assertIn(("HEAD", "/v2/dst/app/blobs/" + digest), b.requests("HEAD"))  # asked before sent
            puts = self.blob_puts(b, digest)
            self.assertEqual([int(h["content-length"]) for h in puts], [len(data)])  # one monolithic PUT
        self.assertEqual(self.patches(b), [])
        self.assertFalse([p for m, p, h in b.uploads_of() if "mount" in query_of(p)])  # another registry
        manifest_puts = [(p, headers_of(h)) for m, p, h in b.log if m == "PUT" and "/manifests/" in p]
        self.assertEqual([p for p, _ in manifest_puts], ["/v2/dst/app/manifests/v1"])
        self.assertEqual(manifest_puts[0][1]["content-type"], rp.MT_OCI_MANIFEST)
        self.assertEqual([m for m, p, h in a.log if m not in ("GET", "HEAD")], [])  # the source only read

    def test_shared_blobs_are_skipped_and_only_new_ones_uploaded(self):
        a, b = self.two()
        base = make_layer({"etc/base": os.urandom(5000)})
        first = a.push("src/app", "v1", Image(layers=[base, make_layer({"app/one": os.urandom(4000)})]))
        second = a.push("src/app", "v2", Image(layers=[base, make_layer({"app/two": os.urandom(4000)})]))
        self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1")
        mark = len(b.log)
        res = self.copy(a.host + "/src/app:v2", b.host + "/dst/app:v2")
        shared = sha256(base[0])
        self.assertEqual(res["skipped"], [shared])
        self.assertEqual(sorted(res["uploaded"]), sorted(set(second.blobs()) - {shared}))
        self.assertEqual(res["mounted"], [])
        self.assertEqual(len([p for m, p, h in b.log[mark:] if m == "POST"]), 2)  # config and the new layer
        self.assertEqual(b.manifests[("dst/app", "v2")][1], second.manifest)
        self.assertEqual(b.manifests[("dst/app", "v1")][1], first.manifest)
        # Everything there already: nothing sent but the manifest.
        mark = len(b.log)
        res = self.copy(a.host + "/src/app:v2", b.host + "/dst/app:v2")
        self.assertEqual((res["uploaded"], sorted(res["skipped"])), ([], sorted(second.blobs())))
        self.assertEqual([p for m, p, h in b.log[mark:] if "/blobs/uploads/" in p], [])

    def test_copy_within_a_registry_mounts_every_blob(self):
        reg = self.registry(per_repo=True)
        img = reg.push("src/app", "v1", Image())
        mark = len(reg.log)
        res = self.copy(reg.host + "/src/app:v1", reg.host + "/other/app:v1")
        self.assertEqual(sorted(res["mounted"]), sorted(img.blobs()))
        self.assertEqual((res["uploaded"], res["skipped"]), ([], []))
        self.assertEqual(sorted(reg.mounted), sorted(("other/app", d, "src/app") for d in img.blobs()))
        posts = [query_of(p) for m, p, h in reg.log[mark:] if m == "POST"]
        self.assertEqual(sorted(q["mount"][0] for q in posts), sorted(img.blobs()))
        self.assertEqual(set(q["from"][0] for q in posts), {"src/app"})
        self.assertEqual([m for m, p, h in reg.log[mark:] if m in ("PATCH", "PUT") and "/blobs/" in p], [])
        self.assertEqual(reg.manifests[("other/app", "v1")][1], img.manifest)

    def test_a_mount_answered_202_uploads_through_that_session(self):
        reg = self.registry(per_repo=True)
        img = reg.push("src/app", "v1", Image())
        reg.refuse_mount = True
        mark = len(reg.log)
        res = self.copy(reg.host + "/src/app:v1", reg.host + "/other/app:v1")
        self.assertEqual((sorted(res["uploaded"]), res["mounted"]), (sorted(img.blobs()), []))
        self.assertEqual(len([p for m, p, h in reg.log[mark:] if m == "POST"]), len(img.blobs()))  # no 2nd POST
        self.assertEqual(reg.manifests[("other/app", "v1")][1], img.manifest)

    def test_push_tokens_ask_pull_push_and_the_mount_source_pull(self):
        reg = self.registry(auth="bearer", per_repo=True)
        img = reg.push("src/app", "v1", Image())
        res = self.copy(reg.host + "/src/app:v1", reg.host + "/other/app:v1")
        self.assertEqual(sorted(res["mounted"]), sorted(img.blobs()))
        scopes = set()
        for method, q, auth in reg.token_requests:
            for value in q.get("scope", []):
                scopes.update(value.split())
        self.assertIn("repository:other/app:pull,push", scopes)
        self.assertIn("repository:src/app:pull", scopes)
        self.assertEqual(reg.manifests[("other/app", "v1")][1], img.manifest)

    def test_blobs_above_the_chunk_size_go_in_patch_chunks(self):
        a, b = self.two()
        img = a.push("src/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        code, out, err = self.main("copy", "--home", self.home, "--json", "--chunk-size", "65536",
                                   a.host + "/src/app:v1", "docker://%s/dst/app:v1" % b.host)
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(set(doc), self.KEYS)
        self.assertEqual((doc["digest"], sorted(doc["uploaded"])), (img.digest, sorted(img.blobs())))
        self.assertEqual(b.blobs[big], img.layers[0])
        patches = self.patches(b)
        self.assertGreaterEqual(len(patches), 5)  # 300 KB in 64 KiB chunks
        end = -1
        for h in patches:
            start, last = map(int, h["content-range"].replace("bytes", "").strip(" =").split("-"))
            self.assertEqual(start, end + 1)
            self.assertEqual(int(h["content-length"]), last - start + 1)
            self.assertLessEqual(last - start + 1, 65536)
            self.assertEqual(h["content-type"], "application/octet-stream")
            end = last
        self.assertEqual(end, len(img.layers[0]) - 1)
        self.assertEqual([int(h.get("content-length", 0)) for h in self.blob_puts(b, big)], [0])  # the closing PUT
        config = sha256(img.config)
        self.assertEqual([int(h["content-length"]) for h in self.blob_puts(b, config)], [len(img.config)])
        self.assertEqual(b.manifests[("dst/app", "v1")][1], img.manifest)

    def test_a_registry_refusing_chunks_gets_one_monolithic_put(self):
        for status in (405, 400):
            with self.subTest(status=status):
                a, b = self.two()
                img = a.push("src/app", "v1", self.big_image())
                big = sha256(img.layers[0])
                b.refuse_chunked = status
                res = self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", chunk_size=65536)
                self.assertEqual(res["digest"], img.digest)
                self.assertEqual(len(self.patches(b)), 1)  # refused once, never tried again
                self.assertEqual([int(h["content-length"]) for h in self.blob_puts(b, big)], [len(img.layers[0])])
                self.assertEqual(b.blobs[big], img.layers[0])
                self.assertEqual(b.manifests[("dst/app", "v1")][1], img.manifest)

    def test_a_cut_chunk_resumes_where_the_registry_kept_it(self):
        a, b = self.two()
        img = a.push("src/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        b.cut_patch, b.keep_cut_uploads = 3, True
        res = self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", chunk_size=65536)
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(b.blobs[big], img.layers[0])
        self.assertTrue([p for m, p, h in b.uploads_of() if m == "GET"], "upload status never asked")
        self.assertEqual(len(b.requests("POST")), 2)  # config and layer: one session each, the cut one resumed
        self.assertLess(b.received - len(img.config), len(img.layers[0]) + 65536)  # nothing resent from 0
        self.assertEqual(b.manifests[("dst/app", "v1")][1], img.manifest)

    def test_a_cut_chunk_the_registry_dropped_starts_again(self):
        a, b = self.two()
        img = a.push("src/app", "v1", self.big_image())
        big = sha256(img.layers[0])
        b.cut_patch, b.keep_cut_uploads = 3, False
        res = self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", chunk_size=65536)
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(b.blobs[big], img.layers[0])
        self.assertEqual(res["uploaded"].count(big), 1)
        self.assertEqual(len(b.requests("POST")), 3)  # config, layer, and the layer once more from 0
        self.assertEqual([d for r, d in b.uploaded].count(big), 1)
        self.assertGreaterEqual(b.received - len(img.config), len(img.layers[0]) + 2 * 65536)
        self.assertEqual(b.manifests[("dst/app", "v1")][1], img.manifest)

    def test_all_copies_an_index_with_attestations_byte_for_byte(self):
        a, b = self.two()
        images = [Image("amd64"), Image("arm64", "v8")]
        index = push_attested_index(a, "src/multi", "v1", images)
        children = json.loads(index)["manifests"]
        res = self.copy(a.host + "/src/multi:v1", b.host + "/dst/multi:v1", all_platforms=True)
        self.assertEqual(res["digest"], sha256(index))
        self.assertEqual(b.manifests[("dst/multi", "v1")], (rp.MT_OCI_INDEX, index))
        for child in children:
            self.assertEqual(b.manifests[("dst/multi", child["digest"])], a.manifests[("src/multi", child["digest"])])
        for digest in a.links["src/multi"]:
            self.assertEqual(b.blobs[digest], a.blobs[digest])
        self.assertEqual(sorted(res["uploaded"]), sorted(a.links["src/multi"]))
        puts = [(p, headers_of(h)["content-type"]) for m, p, h in b.log if m == "PUT" and "/manifests/" in p]
        self.assertEqual(puts[-1], ("/v2/dst/multi/manifests/v1", rp.MT_OCI_INDEX))  # the parent last
        self.assertEqual(sorted(p.rsplit("/", 1)[1] for p, _ in puts[:-1]), sorted(c["digest"] for c in children))
        # The CLI: --all, and --platform all as its alias.
        for flag in (["--all"], ["--platform", "all"]):
            with self.subTest(flag=flag):
                repo = "cli/" + flag[-1].strip("-")
                code, out, err = self.main("copy", "--home", self.home, "-q", *flag, a.host + "/src/multi:v1",
                                           "%s/%s:v1" % (b.host, repo))
                self.assertEqual(code, 0, err)
                self.assertEqual(b.manifests[(repo, "v1")], (rp.MT_OCI_INDEX, index))

    def test_platform_copies_that_image_only(self):
        a, b = self.two()
        amd, arm = Image("amd64"), Image("arm64", "v8")
        a.push_index("src/multi", "v1", [amd, arm], attestations=False)
        res = self.copy(a.host + "/src/multi:v1", b.host + "/dst/app:v1", platform="linux/arm64")
        self.assertEqual(res["digest"], arm.digest)
        self.assertEqual(b.manifests[("dst/app", "v1")], (rp.MT_OCI_MANIFEST, arm.manifest))
        self.assertEqual(sorted(res["uploaded"]), sorted(arm.blobs()))
        self.assertEqual([k for k, (mt, _) in b.manifests.items() if mt == rp.MT_OCI_INDEX], [])

    def test_docker_media_types_are_kept(self):
        a, b = self.two()
        img = a.push("src/app", "v1", Image(types=DOCKER))
        self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1")
        self.assertEqual(b.manifests[("dst/app", "v1")], (rp.MT_DOCKER_MANIFEST, img.manifest))
        images = [Image("amd64", types=DOCKER), Image("arm64", "v8", types=DOCKER)]
        digest = a.push_index("src/list", "v1", images, types=DOCKER, attestations=False)
        res = self.copy(a.host + "/src/list:v1", b.host + "/dst/list:v1", all_platforms=True)
        self.assertEqual(res["digest"], digest)
        self.assertEqual(b.manifests[("dst/list", "v1")], a.manifests[("src/list", "v1")])
        for img in images:
            self.assertEqual(b.manifests[("dst/list", img.digest)], (rp.MT_DOCKER_MANIFEST, img.manifest))

    def test_an_oci_layout_is_a_source(self):
        a, b = self.two()
        img = a.push("src/app", "v1", Image())
        layout = os.path.join(self.home, "carried")
        code, out, err = self.main("--home", self.home, "--platform", "linux/amd64", "--oci-layout", layout + ":v1",
                                   a.host + "/src/app:v1")
        self.assertEqual(code, 0, err)
        res = self.copy("oci:%s:v1" % layout, b.host + "/dst/app:v1", home=os.path.join(self.home, "other"))
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(sorted(res["uploaded"]), sorted(img.blobs()))
        self.assertEqual(b.manifests[("dst/app", "v1")], (rp.MT_OCI_MANIFEST, img.manifest))
        code, out, err = self.main("copy", "--home", self.home, "oci:%s:v1" % layout,
                                   "docker://%s/dst/app:v2" % b.host)
        self.assertEqual(code, 0, err)
        self.assertEqual(b.manifests[("dst/app", "v2")][1], img.manifest)

    def test_the_destination_tag_defaults_to_the_source_tag(self):
        a, b = self.two()
        img = a.push("src/app", "v7", Image())
        res = self.copy("docker://%s/src/app:v7" % a.host, "docker://%s/dst/app" % b.host)
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(b.manifests[("dst/app", "v7")][1], img.manifest)
        self.assertNotIn(("dst/app", "latest"), b.manifests)

    def test_credentials_are_the_destinations(self):
        a = self.registry(per_repo=True)
        b = self.registry(auth="basic", per_repo=True)
        img = a.push("src/app", "v1", Image())
        with self.assertRaises(rp.AuthError):
            self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1")
        res = self.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", username="alice", password="s3cret")
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(b.manifests[("dst/app", "v1")][1], img.manifest)
        stdin = sys.stdin
        self.addCleanup(setattr, sys, "stdin", stdin)
        sys.stdin = io.StringIO("s3cret\n")
        code, out, err = self.main("copy", "--home", self.home, "--username", "alice", "--password-stdin",
                                   a.host + "/src/app:v1", b.host + "/dst/app:v2")
        self.assertEqual(code, 0, err)
        self.assertNotIn("s3cret", out + err)
        self.assertEqual(b.manifests[("dst/app", "v2")][1], img.manifest)
        self.assertEqual([h for m, p, h in a.log if "Authorization" in h], [])  # never sent to the source
        code, out, err = self.main("copy", "--home", self.home, a.host + "/src/app:v1", b.host + "/dst/app:v3")
        self.assertEqual(code, 3, err)

    def test_a_corrupt_source_blob_is_never_tagged_at_the_destination(self):
        a, b = self.two()
        img = a.push("src/app", "v1", Image())
        a.blobs[sha256(img.layers[1])] = bytes([img.layers[1][0] ^ 1]) + img.layers[1][1:]
        code, out, err = self.main("copy", "--home", self.home, a.host + "/src/app:v1", b.host + "/dst/app:v1")
        self.assertEqual(code, 5, err)
        self.assertNotIn(("dst/app", "v1"), b.manifests)
        self.assertNotIn(sha256(img.layers[1]), b.blobs)

    def test_local_destinations_and_a_file_of_pairs(self):
        """copy into oci:DIR:NAME or docker-archive:FILE; --from-file pairs and --dest-prefix as skopeo sync maps."""
        a, b = self.two()
        img = a.push("src/app", "v1", Image())
        a.push("src/other", "v2", Image())
        layout, archive = os.path.join(self.home, "lay"), os.path.join(self.home, "img.tar")
        for dst in ("oci:%s:v1" % layout, "docker-archive:" + archive):
            with self.subTest(dst=dst):
                code, out, err = self.main("copy", "--home", self.home, "--platform", "linux/amd64",
                                           a.host + "/src/app:v1", dst)
                self.assertEqual(code, 0, err)
        with open(os.path.join(layout, "index.json")) as f:
            self.assertEqual(json.load(f)["manifests"][0]["digest"], img.digest)
        self.assertTrue(tarfile.is_tarfile(archive))
        listing = os.path.join(self.home, "sync.txt")
        with open(listing, "w") as f:
            f.write("# mirror these\n%s/src/app:v1\n%s/src/other:v2   %s/kept/other:v2\n" % (a.host, a.host, b.host))
        code, out, err = self.main("copy", "--home", self.home, "--platform", "linux/amd64", "--from-file", listing,
                                   "--dest-prefix", b.host + "/mirror")
        self.assertEqual(code, 0, err)
        self.assertEqual(b.manifests[("mirror/src/app", "v1")][1], img.manifest)
        self.assertIn(("kept/other", "v2"), b.manifests)

    def test_usage_errors(self):
        self.no_network_names()  # a bare "copy" must never become a pull of docker.io/library/copy
        reg = self.registry()
        reg.push("src/app", "v1", Image())
        src = reg.host + "/src/app:v1"
        for argv in (["copy", src], ["copy"], ["copy", src, "Not A Ref!!"],
                     ["copy", "--chunk-size", "lots", src, reg.host + "/dst/app:v1"]):
            with self.subTest(argv=argv):
                code, out, err = self.main(*argv)
                self.assertEqual(code, 2, err)
                self.assertNotIn("Traceback", err)
        self.assertEqual([k for k in reg.manifests if k[0] == "dst/app"], [])
        code, out, err = self.main("copy", "--help")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("usage: registry_pull copy"), out[:80])
        for option in ("--all", "--platform", "--chunk-size", "--password-stdin"):
            self.assertIn(option, out)


class ManyImagesTests(Base):
    """Several references in one run: every one tried, blobs shared, one layout and archive for all."""

    def test_references_and_a_file_of_them(self):
        reg = self.registry(auth="bearer")
        shared = make_layer({"base": os.urandom(50000)})
        images = [reg.push("many/app%d" % i, "v1", Image(layers=[shared, make_layer({"n": b"%d" % i})]))
                  for i in range(20)]
        listing = os.path.join(self.home, "images.txt")
        with open(listing, "w") as f:
            f.write("# the bundle\n\n" + "".join("%s/many/app%d:v1  # one\n" % (reg.host, i) for i in range(2, 20)))
        layout = os.path.join(self.home, "layout")
        code, out, err = self.main("--home", self.home, "pull", "--platform", "linux/amd64", "--json",
                                   "--oci-layout", layout, "--from-file", listing,
                                   reg.host + "/many/app0:v1", reg.host + "/many/app1:v1")
        self.assertEqual(code, 0, err)
        docs = json.loads(out)
        self.assertEqual(sorted(d["manifest_digest"] for d in docs), sorted(i.digest for i in images))
        unique = set(d for i in images for d in i.blobs())
        fetched = [p.rsplit("/", 1)[1] for m, p in reg.requests("GET", "blobs")]
        self.assertEqual(sorted(fetched), sorted(unique))  # each blob once: the bytes fetched are the unique blobs
        self.assertEqual(sum(d["downloaded_bytes"] for d in docs), sum(len(b) for b in
                                                                        dict((d, b) for i in images
                                                                             for d, b in i.blobs().items()).values()))
        with open(os.path.join(layout, "index.json")) as f:
            names = sorted(e["annotations"][rp._REF_NAME] for e in json.load(f)["manifests"])
        self.assertEqual(names, sorted("%s/many/app%d:v1" % (reg.host, i) for i in range(20)))
        if SKOPEO:
            for name in names:
                proc = subprocess.run([SKOPEO, "inspect", "oci:%s:%s" % (layout, name)], stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_a_list_too_long_to_read_whole_is_refused_not_cut(self):
        listing = os.path.join(self.home, "long.txt")
        with open(listing, "w") as f:
            f.write("# padding\n" * (1700 * 1024) + "127.0.0.1:9/app:v1.2\n")  # cut at 16 MiB: "...:v1"
        code, out, err = self.main("--home", self.home, "pull", "--from-file", listing)
        self.assertEqual(code, 2, err)
        self.assertIn("longer than", err)

    def test_a_reference_named_twice_is_one_entry_of_the_layout_and_the_archive(self):
        reg = self.registry()
        reg.push("many/twice", "v1", Image())
        layout, archive = os.path.join(self.home, "layout"), os.path.join(self.home, "all.tar")
        ref = reg.host + "/many/twice:v1"
        code, out, err = self.main("--home", self.home, "pull", "--platform", "linux/amd64", "--json",
                                   "--oci-layout", layout, "--docker-archive", archive, ref, ref)
        self.assertEqual(code, 0, err)
        self.assertEqual(len(json.loads(out)), 2)  # a result for each reference given, in order
        with open(os.path.join(layout, "index.json")) as f:
            names = [e["annotations"][rp._REF_NAME] for e in json.load(f)["manifests"]]
        self.assertEqual(names, [ref])
        with tarfile.open(archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        self.assertEqual([m["RepoTags"] for m in manifest], [[ref]])

    def test_every_reference_is_tried_and_the_first_failure_is_the_exit_code(self):
        reg = self.registry()
        img = reg.push("many/ok", "v1", Image())
        archive = os.path.join(self.home, "all.tar")
        code, out, err = self.main("--home", self.home, "pull", "--platform", "linux/amd64", "--docker-archive",
                                   archive, reg.host + "/many/missing:v1", reg.host + "/many/ok:v1")
        self.assertEqual(code, 4, err)
        self.assertIn("failed %s/many/missing:v1" % reg.host, err)
        self.assertIn("pulled %s/many/ok:v1" % reg.host, err)
        self.assertIn("1 of 2 pulled", err)
        self.assertStoreHas(img)
        with tarfile.open(archive) as tar:
            manifest = json.load(tar.extractfile("manifest.json"))
        self.assertEqual(len(manifest), 1)
        code, out, err = self.main("--home", self.home, "pull", "--rootfs", os.path.join(self.home, "r"),
                                   reg.host + "/many/ok:v1", reg.host + "/many/ok:v1")
        self.assertEqual(code, 2, err)  # --rootfs takes one reference
        code, out, err = self.main("--home", self.home, "pull", "--oci-layout", os.path.join(self.home, "l") + ":x",
                                   reg.host + "/many/ok:v1", reg.host + "/many/ok:v1")
        self.assertEqual(code, 2, err)  # DIR:NAME with several references


class CommandScopeTests(Base):
    """What one command's options are for: --username and --cert-dir name one registry."""

    def test_credentials_for_one_registry_only(self):
        a, b = self.registry(), self.registry()
        code, out, err = self.main("--home", self.home, "pull", "--username", "alice", "--password-stdin",
                                   a.host + "/x/y:v1", b.host + "/x/y:v1")
        self.assertEqual(code, 2, err)
        self.assertIn("one registry", err)
        self.assertEqual(a.log + b.log, [])

    def test_copy_keeps_the_destinations_referrers_index(self):
        a, b = self.registry(), self.registry()
        img = a.push("ref/app", "v1", Image())
        subject = {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest)}
        ours = push_artifact(a, "ref/app", None, Artifact({"sbom.json": b"{}"}, subject=subject,
                                                           artifact_type="application/spdx+json"))
        tag = img.digest.replace(":", "-")
        a.manifests[("ref/app", tag)] = (rp.MT_OCI_INDEX, json.dumps(
            {"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": [ours.descriptor()]}).encode())
        theirs = push_artifact(b, "dst/app", None, Artifact({"bundle.json": b"{}"}, subject=subject,
                                                             artifact_type=rp.MT_SIGSTORE_BUNDLE)).descriptor()
        b.manifests[("dst/app", tag)] = (rp.MT_OCI_INDEX, json.dumps(
            {"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX, "manifests": [theirs]}).encode())
        rp.copy(a.host + "/ref/app:v1", b.host + "/dst/app:v1", home=self.home, platform="linux/amd64",
                referrers=True)
        merged = json.loads(b.manifests[("dst/app", tag)][1])["manifests"]
        self.assertEqual(sorted(e["digest"] for e in merged), sorted([theirs["digest"], ours.digest]))

    def test_several_platforms_from_a_layout(self):
        reg = self.registry()
        images = [Image("amd64"), Image("arm64", "v8")]
        reg.push_index("lay/app", "v1", images, attestations=False)
        layout = os.path.join(self.home, "layout")
        self.assertEqual(self.main("--home", self.home, "--platform", "all", "--oci-layout", layout + ":v1",
                                   reg.host + "/lay/app:v1")[0], 0)
        index, results = rp.pull_platforms("oci:%s:v1" % layout, "all", home=os.path.join(self.home, "other"))
        self.assertEqual(sorted(r.manifest_digest for r in results), sorted(i.digest for i in images))


# --------------------------------------------------------------------------- command line


class CliTests(Base):
    def test_json_output(self):
        reg = self.registry()
        img = reg.push("cli/app", "v1", Image())
        code, out, err = self.main(*self.cli_args("--json", reg.host + "/cli/app:v1"))
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(doc["reference"], reg.host + "/cli/app:v1")
        self.assertEqual(doc["manifest_digest"], img.digest)
        self.assertIsNone(doc["index_digest"])
        self.assertEqual(doc["platform"], "linux/amd64")
        self.assertEqual(doc["config_digest"], sha256(img.config))
        self.assertEqual([(x["digest"], x["size"]) for x in doc["layers"]],
                         [(sha256(b), len(b)) for b in img.layers])
        for x in doc["layers"]:
            self.assertTrue(os.path.isfile(x["path"]))
            self.assertEqual(x["media_type"], OCI["layer"])

    def test_the_process_ends_at_once_and_still_does_what_an_exit_does(self):
        """Run as a program, it skips the interpreter's teardown, yet its exit status, its whole
        output through a pipe, other code's atexit functions and a profiler's report survive."""
        script = os.path.join(HERE, "registry_pull.py")
        reg = self.registry()
        img = reg.push("exit/app", "v1", Image(layers=[make_layer({"big": os.urandom(3 * 1024 * 1024)})]))
        proc = subprocess.run([sys.executable, script, *self.cli_args("-q", "--tar", "-", reg.host + "/exit/app:v1")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:  # every byte of a 3 MiB file, then the end
            self.assertEqual(tar.extractfile("big").read(), tarfile.open(fileobj=io.BytesIO(
                gzip.decompress(img.layers[0]))).extractfile("big").read())
        proc = subprocess.run([sys.executable, script, "pull", "no such!"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual((proc.returncode, proc.stdout), (2, b""))
        self.assertIn(b"invalid reference", proc.stderr)
        wrapper = ("import atexit, runpy, sys\n"
                   "atexit.register(lambda: sys.stdout.write('atexit ran\\n'))\n"
                   "sys.argv = [%r, '--version']\n"
                   "runpy.run_path(%r, run_name='__main__')\n" % (script, script))
        proc = subprocess.run([sys.executable, "-c", wrapper], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.decode().split("\n")[-2:], ["atexit ran", ""])
        self.assertIn("registry_pull %s" % rp.__version__, proc.stdout.decode())
        proc = subprocess.run([sys.executable, "-m", "cProfile", script, "--version"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(b"function calls", proc.stdout)  # the profiler's report, printed after the script

    def test_exit_codes(self):
        reg = self.registry(auth="basic")
        reg.push("x/app", "v1", Image())
        open_reg = self.registry()
        img = open_reg.push_index("y/app", "v1", [Image("arm64", "v8")])
        corrupt = open_reg.push("z/app", "v1", Image())
        open_reg.blobs[sha256(corrupt.layers[0])] = b"garbage"
        readonly = os.path.join(self.home, "ro")
        os.makedirs(readonly)
        os.chmod(readonly, 0o555)
        dead = "127.0.0.1:9"  # discard port: nothing listens
        cases = [
            (2, ["Bad/Ref"], "invalid reference"),
            (2, ["--jobs", "0", open_reg.host + "/y/app:v1"], "jobs"),
            (2, ["--platform", "linux/", open_reg.host + "/y/app:v1"], "platform"),
            (3, [reg.host + "/x/app:v1"], "refused"),
            (4, [open_reg.host + "/nope:v1"], "not found"),
            (4, ["--platform", "linux/amd64", open_reg.host + "/y/app:v1"], "linux/arm64/v8"),
            (5, [open_reg.host + "/z/app:v1"], "discarded"),
            (6, [dead + "/a:b"], "127.0.0.1:9"),
        ]
        if os.geteuid() != 0:  # root writes anywhere
            cases.append((7, ["--home", readonly, open_reg.host + "/y/app:v1"], "cannot write"))
        for code, argv, text in cases:
            with self.subTest(case=argv):
                if "--home" not in argv:
                    argv = ["--home", self.home] + argv
                got, out, err = self.main(*argv)
                self.assertEqual(got, code, err)
                lines = self.without_progress(err).splitlines()
                self.assertTrue(lines[-1].startswith("registry_pull: error: "), err)
                self.assertEqual(err.count("error:"), 1, err)
                self.assertTrue(all("retrying" in line for line in lines[:-1]), err)  # retries are said
                self.assertIn(text, lines[-1])
                self.assertNotIn("Traceback", err)
                self.assertEqual(out, "")

    def test_default_home_from_environment(self):
        reg = self.registry()
        img = reg.push("envhome/app", "v1", Image())
        home = os.path.join(self.home, "from-env")
        os.environ["REGISTRY_PULL_HOME"] = home
        self.addCleanup(os.environ.pop, "REGISTRY_PULL_HOME", None)
        code, out, err = self.main("--json", "--platform", "linux/amd64", reg.host + "/envhome/app:v1")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["home"], home)
        del os.environ["REGISTRY_PULL_HOME"]
        self.addCleanup(self._restore_env, "XDG_DATA_HOME", os.environ.get("XDG_DATA_HOME"))
        os.environ["XDG_DATA_HOME"] = os.path.join(self.home, "xdg")
        self.assertEqual(rp.default_home(), os.path.join(self.home, "xdg", "registry_pull"))

    def test_storage_error_file_as_home(self):
        path = os.path.join(self.home, "file")
        open(path, "w").close()
        code, out, err = self.main("--home", path, "127.0.0.1:9/a:b")
        self.assertEqual(code, 7, err)
        self.assertIn("cannot write to the store", err)

    def test_password_stdin(self):
        reg = self.registry(auth="basic")
        img = reg.push("pw/app", "v1", Image())
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "registry_pull.py"),
             *self.cli_args("-v", "--username", "alice", "--password-stdin", reg.host + "/pw/app:v1")],
            input=b"s3cret\n", stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertNotIn(b"s3cret", proc.stderr + proc.stdout)
        self.assertStoreHas(img)

    def test_subprocess(self):
        reg = self.registry(auth="bearer")
        img = reg.push_index("sub/app", "latest", [Image("amd64"), Image("arm64", "v8")])
        proc = subprocess.run(
            [sys.executable, os.path.join(HERE, "registry_pull.py"), "--home", self.home, "--json",
             "--platform", "linux/arm64", reg.host + "/sub/app"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        doc = json.loads(proc.stdout)
        self.assertEqual(doc["index_digest"], img)
        self.assertEqual(doc["platform"], "linux/arm64/v8")
        proc = subprocess.run([sys.executable, os.path.join(HERE, "registry_pull.py"), "--home", self.home,
                               "lower/UPPER"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 2)
        self.assertEqual(proc.stderr.count(b"\n"), 1, proc.stderr)

    def test_progress_bars_only_on_a_terminal(self):
        import pty
        reg = self.registry()
        img = reg.push("bars/app", "v1", Image())
        master, slave = pty.openpty()
        self.addCleanup(os.close, master)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "registry_pull.py"),
                                 *self.cli_args(reg.host + "/bars/app:v1")], stdout=subprocess.PIPE, stderr=slave)
        os.close(slave)
        screen = read_terminal(master).decode()
        proc.communicate(timeout=60)
        self.assertEqual(proc.returncode, 0)
        for blob in [img.config] + img.layers:
            self.assertIn(sha256(blob)[7:19], screen)  # a bar per blob, named by its digest
        self.assertIn("/s", screen)  # the rate
        self.assertIn("[" + "#" * 10, screen)
        self.assertIn("registry_pull: pulled", screen)  # the one-line summary
        # Not a terminal: no bars, a line per blob and the summary; -q: nothing at all.
        shutil.rmtree(os.path.join(self.home, "blobs"))
        code, out, err = self.main(*self.cli_args(reg.host + "/bars/app:v1"))
        self.assertEqual(code, 0)
        self.assertNotIn("\x1b[", err)
        self.assertEqual(err.count("\n"), 1 + len(img.layers) + 1, err)
        for blob in [img.config] + img.layers:
            self.assertIn("registry_pull: %s " % sha256(blob)[:19], err)
        self.assertEqual(self.without_progress(err).count("\n"), 1, err)
        code, out, err = self.main("-q", "--home", self.home, "--platform", "linux/amd64", reg.host + "/bars/app:v1")
        self.assertEqual((code, out, err), (0, "", ""))

    def test_help_and_version(self):
        code, out, err = self.main("--help")
        self.assertEqual(code, 0)
        for c in ("0 ", "2 ", "3 ", "4 ", "5 ", "6 ", "7 "):
            self.assertIn("\n  " + c, out)
        code, out, err = self.main("--version")
        self.assertEqual(code, 0)
        self.assertIn(rp.__version__, out)

    def test_import_is_cheap(self):
        code = "import sys, registry_pull; print('sqlite3' in sys.modules)"
        out = subprocess.run([sys.executable, "-c", code], cwd=HERE, stdout=subprocess.PIPE, timeout=60)
        self.assertEqual(out.stdout.strip(), b"False")

    def test_minimal_python_without_ssl_or_sqlite3(self):
        reg = self.registry()
        img = reg.push("min/app", "v1", Image())
        # sys.modules[name] = None makes "import name" fail, as on a Python built without it.
        code = ("import sys; sys.modules['ssl'] = sys.modules['_ssl'] = None; "
                "sys.modules['sqlite3'] = sys.modules['_sqlite3'] = None; "
                "import registry_pull; sys.exit(registry_pull.main(sys.argv[1:]))")
        base = [sys.executable, "-c", code, *self.cli_args()]
        proc = subprocess.run(base + [reg.host + "/min/app:v1"], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(b"no sqlite3 module", proc.stderr)
        self.assertStoreHas(img)
        self.assertFalse(os.path.exists(os.path.join(self.home, "oci.db")))
        proc = subprocess.run(base + ["registry.example.com/a:b"], cwd=HERE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 6, proc.stderr)
        self.assertIn(b"no ssl module", proc.stderr)

    def test_the_summary_line_carries_no_escape(self):
        reg = self.registry()
        img = Image("amd64")
        img.edit(config=lambda cfg: cfg.update(variant="\x1b]0;owned\x07\x1b[2J"))
        reg.push_index("esc/sum", "v1", [img])
        code, out, err = self.main(*self.cli_args(reg.host + "/esc/sum:v1"))
        self.assertEqual(code, 0, err)
        self.assertNotIn("\x1b", err)
        self.assertIn("\\x1b", err)


class MessageTests(Base):
    """What the command line says, and where."""

    def test_platform_all_summary_goes_to_stderr_with_the_prefix(self):
        """`pull --platform all` prints its summary on stderr, prefixed `registry_pull:`, as a single pull does."""
        reg = self.registry()
        reg.push_index("all/app", "v1", [Image("amd64"), Image("arm64", "v8")], attestations=False)
        code, out, err = self.main("pull", "--home", self.home, "--platform", "all", reg.host + "/all/app:v1")
        self.assertEqual(code, 0, err)
        self.assertEqual(out, "", "the summary went to stdout")
        self.assertIn("registry_pull: pulled", err)

    def test_interrupt_does_not_promise_partial_downloads_that_do_not_exist(self):
        """Ctrl-C while the manifest is awaited (nothing downloaded): exit 130, no word of partial downloads kept."""
        # A real process and a real SIGINT: the message is about this run, whatever ran before in this process.
        def answer(conn, method, path, headers, server):
            if path == "/v2/":
                return server.reply(conn, "200 OK", b"{}", [("Content-Type", "application/json")], method == "HEAD")
            while server.alive():  # the manifest never comes
                time.sleep(0.05)
            return False
        server = RawServer(self, answer)
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "registry_pull.py"), "pull", "--home", self.home,
                                 "--platform", "linux/amd64", server.host + "/int/app:v1"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.addCleanup(lambda: proc.poll() is None and proc.kill())
        deadline = time.monotonic() + 5
        while not any("/manifests/" in p for _, p in server.requests) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.assertTrue(any("/manifests/" in p for _, p in server.requests), server.requests)
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=CAP)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            self.fail("still running %.0fs after SIGINT" % CAP)
        err = err.decode("utf-8", "replace")
        self.assertEqual(proc.returncode, 130, err)
        self.assertIn("interrupted", err)
        self.assertNotIn("partial downloads are kept", err)

    def test_unknown_tag_suggests_listing_tags(self):
        """A pull of a tag the registry does not know (MANIFEST_UNKNOWN) suggests listing the tags."""
        reg = self.registry()
        reg.push("miss/app", "v1", Image())
        code, out, err = self.main(*self.cli_args(reg.host + "/miss/app:v9"))
        self.assertEqual(code, 4, err)
        self.assertIn("tags", err)

    def test_pull_summary_says_where_the_image_went(self):
        """The pull summary names the store path, or the output written."""
        reg = self.registry()
        reg.push("where/app", "v1", Image())
        archive = os.path.join(self.home, "out.tar")
        for extra, place in (((), os.path.abspath(self.home)), (("--docker-archive", archive), archive)):
            with self.subTest(place=place):
                code, out, err = self.main(*self.cli_args(*(extra + (reg.host + "/where/app:v1",))))
                self.assertEqual(code, 0, err)
                summary = [line for line in err.splitlines() if line.startswith("registry_pull: pulled")]
                self.assertEqual(len(summary), 1, err)
                self.assertIn(place, summary[0])


class VerbTests(Base):
    def test_every_verb_works(self):
        reg = self.registry()
        img = reg.push("verb/app", "v1", Image())
        reg.push("verb/app", "v2", img)
        ref = reg.host + "/verb/app:v1"
        reg.fault = serve_tags(reg, "verb/app")
        code, out, err = self.main("--home", self.home, "pull", "--platform", "linux/amd64", ref)
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        code, out, err = self.main("inspect", "--json", "--home", self.home, ref)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["Digest"], img.digest)
        code, out, err = self.main("tags", reg.host + "/verb/app")
        self.assertEqual((code, sorted(out.split())), (0, ["v1", "v2"]), err)
        code, out, err = self.main("images", "--home", self.home)
        self.assertEqual(code, 0, err)
        self.assertIn("REFERENCE", out.splitlines()[0])  # a header line
        self.assertIn(ref, out)
        code, out, err = self.main("verify", "--home", self.home)
        self.assertEqual((code, out.strip()), (0, "every blob is what its digest says"), err)
        code, out, err = self.main("rm", "--home", self.home, ref)
        self.assertEqual(code, 0, err)
        self.assertIn("removed 1 image", out)
        code, out, err = self.main("gc", "--home", self.home, "--json")
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["deleted"], 1 + 1 + len(img.layers))  # manifest, config, layers
        self.assertEqual(self.image_rows(), [])

    def test_each_verb_has_its_own_help(self):
        for verb in ("pull", "inspect", "tags", "images", "rm", "gc", "verify"):
            with self.subTest(verb=verb):
                code, out, err = self.main(verb, "--help")
                self.assertEqual(code, 0, err)
                self.assertTrue(out.startswith("usage: registry_pull %s" % verb), out[:80])
        code, out, err = self.main("--help")
        self.assertEqual(code, 0)
        for verb in ("pull", "inspect", "tags", "images", "rm", "gc", "verify", "deprecated"):
            self.assertIn(verb, out)
        code, out, err = self.main("tags", "--help")
        self.assertNotIn("--rootfs", out)  # only the options that mean something to the verb

    def test_a_bare_reference_pulls_and_pull_names_an_image_called_like_a_verb(self):
        reg = self.registry()
        img = reg.push("inspect", "latest", Image())
        code, out, err = self.main("--home", self.home, "--platform", "linux/amd64", reg.host + "/verb/none:v1")
        self.assertEqual(code, 4, err)  # a pull: not found
        code, out, err = self.main("--home", self.home, "pull", "--platform", "linux/amd64", reg.host + "/inspect")
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        code, out, err = self.main("inspect")  # the verb, asking for its reference
        self.assertEqual(code, 2)
        self.assertIn("REFERENCE", err)

    def test_the_old_options_still_work(self):
        reg = self.registry()
        img = reg.push("old/app", "v1", Image())
        ref = reg.host + "/old/app:v1"
        reg.fault = serve_tags(reg, "old/app")
        self.assertEqual(self.main(*self.cli_args(ref))[0], 0)
        for argv, want in ((["--inspect", "--json", ref], img.digest), (["--list-tags", ref], "v1"),
                           (["--images"], ref), (["--verify"], "every blob"), (["--remove", ref], "removed 1"),
                           (["--gc"], "deleted")):
            with self.subTest(argv=argv[0]):
                code, out, err = self.main("--home", self.home, *argv)
                self.assertEqual(code, 0, err)
                self.assertIn(want, out)

    def test_global_options_before_the_verb_and_one_line_usage_errors(self):
        reg = self.registry()
        reg.push("glob/app", "v1", Image())
        code, out, err = self.main("--home", self.home, "-v", "inspect", "--json", reg.host + "/glob/app:v1")
        self.assertEqual(code, 0, err)
        code, out, err = self.main("tags", "--rootfs", "x", reg.host + "/glob/app")
        self.assertEqual(code, 2)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("see registry_pull tags --help", err)

    def test_a_mistyped_home_is_not_made(self):
        missing = os.path.join(self.home, "no-such-store")
        for verb in ("images", "gc", "verify"):
            with self.subTest(verb=verb):
                code, out, err = self.main(verb, "--home", missing)
                self.assertEqual(code, 4, err)
                self.assertIn("no store", err)
                self.assertFalse(os.path.exists(missing))


class ProgressTests(Base):
    def big_image(self, reg):
        return reg.push("prog/app", "v1", Image(layers=[make_layer({"a": os.urandom(1 << 20)}),
                                                        make_layer({"b": os.urandom(1 << 20)})]))

    def test_a_log_gets_a_line_per_blob_and_periodic_totals(self):
        """stderr to a file: one line per finished blob and totals while bytes arrive."""
        reg = self.registry()
        img = self.big_image(reg)
        reg.fault = slow_blob(reg, sha256(img.layers[0]), chunk=65536, delay=0.03)  # ~0.5 s for the MiB
        log_path = os.path.join(self.home, "pull.log")
        with open(log_path, "wb") as log_file:
            proc = subprocess.run([sys.executable, "-c", "import registry_pull as rp, sys; rp.PROGRESS_INTERVAL = 0.1; "
                                   "sys.exit(rp.main(sys.argv[1:]))", *self.cli_args(reg.host + "/prog/app:v1")],
                                  cwd=HERE, stdout=subprocess.PIPE, stderr=log_file, timeout=60)
        self.assertEqual(proc.returncode, 0)
        with open(log_path) as f:
            lines = f.read().splitlines()
        done = [ln for ln in lines if " done in " in ln]
        totals = [ln for ln in lines if re.search(r" of .* \(\d+%\), .*/s, ETA ", ln)]
        self.assertEqual(len(done), 1 + len(img.layers), lines)  # config and each layer
        for blob in [img.config] + img.layers:
            self.assertTrue(any(sha256(blob)[:19] in ln for ln in done), (sha256(blob), lines))
        self.assertGreaterEqual(len(totals), 2, lines)
        self.assertTrue(all(PROGRESS_LINE.match(ln) for ln in done + totals), lines)
        self.assertTrue(lines[-1].startswith("registry_pull: pulled"), lines)
        self.assertNotIn("\x1b[", "".join(lines))

    def test_progress_modes(self):
        reg = self.registry()
        reg.push("modes/app", "v1", Image())
        ref = reg.host + "/modes/app:v1"
        code, out, err = self.main(*self.cli_args("--progress", "none", ref))
        self.assertEqual((code, err.count("\n")), (0, 1), err)  # the summary only
        shutil.rmtree(os.path.join(self.home, "blobs"))
        code, out, err = self.main(*self.cli_args("--progress", "bar", ref))
        self.assertEqual(code, 0, err)
        self.assertIn("\x1b[", err)  # bars, asked for, even without a terminal
        code, out, err = self.main(*self.cli_args("--progress", "plain", ref))
        self.assertIn("present", err)  # the store had every blob
        code, out, err = self.main(*self.cli_args("--progress", "sideways", ref))
        self.assertEqual(code, 2)
        code, out, err = self.main(*self.cli_args("-q", ref))
        self.assertEqual((code, out, err), (0, "", ""))


# --------------------------------------------------------------------------- real tools


@unittest.skipUnless(REGISTRY_BIN and SKOPEO, NEED_REAL)
class DistributionTests(Base):
    def test_anonymous_http_oci_and_docker_types(self):
        dist = Distribution(self)
        oci_img, docker_img = Image(), Image()
        dist.push("oci/app", [oci_img])
        dist.push("docker/app", [docker_img], docker_format=True)
        res = rp.pull(dist.host + "/oci/app:v1", home=self.home, platform="linux/amd64")
        self.assertEqual(res.manifest_digest, oci_img.digest)
        self.assertEqual(res.manifest_media_type, rp.MT_OCI_MANIFEST)
        self.assertStoreHas(oci_img)
        res = rp.pull(dist.host + "/docker/app:v1", home=self.home, platform="linux/amd64")
        self.assertEqual(res.manifest_media_type, rp.MT_DOCKER_MANIFEST)
        self.assertEqual([x.digest for x in res.layers], [sha256(b) for b in docker_img.layers])
        self.assertEqual(res.config.digest, sha256(docker_img.config))
        self.assertStoreHas(docker_img)
        # Re-pull by the digest Distribution reports, and a warm re-pull of the tag.
        again = rp.pull(dist.host + "/docker/app@" + res.manifest_digest, home=self.home)
        self.assertEqual(again.downloaded_bytes, 0)
        again = rp.pull(dist.host + "/docker/app:v1", home=self.home, platform="linux/amd64")
        self.assertEqual(again.downloaded_bytes, 0)

    def test_index_with_attestations_each_platform(self):
        dist = Distribution(self)
        images = [Image("amd64"), Image("arm64", "v8"), Image("arm", "v7")]
        dist.push("multi/app", images, with_index=True)
        for plat, img in zip(("linux/amd64", "linux/arm64", "linux/arm/v7"), images):
            with self.subTest(case=plat):
                code, out, err = self.main("--home", self.home, "--json", "--platform", plat,
                                           dist.host + "/multi/app:v1")
                self.assertEqual(code, 0, err)
                doc = json.loads(out)
                self.assertEqual(doc["manifest_digest"], img.digest)
                self.assertIsNotNone(doc["index_digest"])
                self.assertStoreHas(img)
        code, out, err = self.main("--home", self.home, "--platform", "linux/s390x", dist.host + "/multi/app:v1")
        self.assertEqual(code, 4)
        self.assertIn("linux/arm/v7", err)
        self.assertNotIn("unknown", err)

    def test_not_found(self):
        dist = Distribution(self)
        dist.push("there/app", [Image()])
        for ref in ("there/app:nope", "missing/app:v1", "there/app@sha256:" + "0" * 64):
            with self.subTest(case=ref):
                code, out, err = self.main("--home", self.home, dist.host + "/" + ref)
                self.assertEqual(code, 4, err)

    @unittest.skipUnless(OPENSSL and HTPASSWD, "needs openssl and htpasswd (apache2-utils)")
    @unittest.skipUnless(OPENSSL, "needs openssl to make a CA")
    def test_private_ca_that_go_and_openssl_accept_works_on_every_python(self):
        # Python 3.13's create_default_context() sets VERIFY_X509_STRICT, which refuses a CA whose
        # basicConstraints is not critical; skopeo, curl and Go accept it. Here 3.13's default is
        # put on whatever Python runs the test, and a real 3.13 runs the CLI where there is one.
        import ssl
        certs = tempfile.mkdtemp(prefix="rp-certs-")
        self.addCleanup(shutil.rmtree, certs, True)
        tls = make_ca(certs, critical=False)
        dist = Distribution(self, tls=tls)
        img = Image()
        dist.push("ca/app", [img])
        real = ssl.create_default_context

        def strict(*args, **kw):
            ctx = real(*args, **kw)
            ctx.verify_flags |= ssl.VERIFY_X509_STRICT
            return ctx
        rp_ssl = __import__("ssl")
        rp_ssl.create_default_context = strict
        self.addCleanup(setattr, rp_ssl, "create_default_context", real)
        code, out, err = self.main(*self.cli_args("--ca-file", tls[0], dist.host + "/ca/app:v1"))
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        wrong = os.path.join(certs, "other")
        os.mkdir(wrong)
        other = make_ca(wrong)
        code, out, err = self.main(*self.cli_args("--ca-file", other[0], dist.host + "/ca/app:v2"))
        self.assertEqual(code, 6, err)
        self.assertIn("although --ca-file %s was loaded" % other[0], err)
        for py313 in glob.glob("/root/.pyenv/versions/3.13*/bin/python3.13") + [shutil.which("python3.13") or ""]:
            if py313 and subprocess.run([py313, "-c", "import ssl"], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL).returncode == 0:
                break  # a real 3.13 (a pyenv shim without one fails)
        else:
            py313 = ""
        if py313:
            proc = subprocess.run([py313, os.path.join(HERE, "registry_pull.py"),
                                   *self.cli_args("--ca-file", tls[0], dist.host + "/ca/app:v1")],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
            self.assertEqual(proc.returncode, 0, proc.stderr)

    def test_tls_and_htpasswd(self):
        certs = tempfile.mkdtemp(prefix="rp-certs-")
        self.addCleanup(shutil.rmtree, certs, True)
        tls = make_ca(certs)
        htpasswd = os.path.join(certs, "htpasswd")
        subprocess.run([HTPASSWD, "-Bbc", htpasswd, "alice", "s3cret"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        dist = Distribution(self, tls=tls, htpasswd=htpasswd)
        img = Image()
        dist.push("tls/app", [img], creds="alice:s3cret")
        ref = dist.host + "/tls/app:v1"
        # Not trusted: a clear TLS error, exit 6.
        os.environ["SSL_CERT_FILE"] = os.path.join(certs, "leaf.ext")  # a file with no CA in it
        self.addCleanup(os.environ.pop, "SSL_CERT_FILE", None)
        code, out, err = self.main("--home", self.home, ref)
        self.assertEqual(code, 6, err)
        self.assertIn("TLS certificate", err)
        self.assertIn("--ca-file", err)
        # Trusted through --ca-file; right, wrong and no password.
        def run(*extra, password=None):
            argv = [sys.executable, os.path.join(HERE, "registry_pull.py"), *self.cli_args(*extra, ref)]
            return subprocess.run(argv, input=(password or "").encode(), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, timeout=120)
        proc = run("--ca-file", tls[0], "--username", "alice", "--password-stdin", password="s3cret\n")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertStoreHas(img)
        proc = run("--ca-file", tls[0], "--username", "alice", "--password-stdin", password="wrong\n")
        self.assertEqual(proc.returncode, 3, proc.stderr)
        self.assertNotIn(b"wrong", proc.stderr)
        proc = run("--ca-file", tls[0])
        self.assertEqual(proc.returncode, 3, proc.stderr)
        # Trusted through SSL_CERT_FILE.
        shutil.rmtree(os.path.join(self.home, "blobs"))
        os.environ["SSL_CERT_FILE"] = tls[0]
        res = rp.pull(ref, home=self.home, platform="linux/amd64", username="alice", password="s3cret")
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)

    def test_silly_bearer_tokens_renewed(self):
        tokens = Registry(token_lifetime=1).start(self)  # only its /token endpoint is used
        dist = Distribution(self, silly_realm="http://%s/token" % tokens.host)
        img = Image(layers=[make_layer({"f%d" % i: os.urandom(1000)}) for i in range(4)])
        dist.push("silly/app", [img])
        before = len(tokens.token_requests)
        # A slow consumer (0.4 s per blob) makes the pull outlive its one-second tokens.
        res = rp.pull(dist.host + "/silly/app:v1", home=self.home, platform="linux/amd64", jobs=1,
                      progress=lambda d, done, total: time.sleep(0.4) if done == total else None)
        self.assertEqual(res.manifest_digest, img.digest)
        self.assertStoreHas(img)
        pulls = tokens.token_requests[before:]
        self.assertGreaterEqual(len(pulls), 2, pulls)
        for _, q, _ in pulls:
            self.assertEqual(q["scope"], ["repository:silly/app:pull"])
            self.assertEqual(q["service"], ["test-registry"])


@unittest.skipUnless(SKOPEO, "needs skopeo (Debian: skopeo); .ci/run installs it")
class OutputToolTests(Base):
    def inspect(self, transport):
        proc = subprocess.run([SKOPEO, "--insecure-policy", "inspect", transport], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)

    def test_skopeo_reads_all_outputs(self):
        reg = self.registry()
        img = reg.push("tools/app", "v1", Image())
        layout = os.path.join(self.home, "layout")
        archive = os.path.join(self.home, "image.tar")
        res = self.pull(reg, "tools/app:v1", oci_layout=layout + ":named", docker_archive=archive)
        want_layers = [sha256(b) for b in img.layers]
        self.assertEqual(self.inspect("oci:%s:named" % layout)["Layers"], want_layers)
        self.assertEqual(self.inspect("oci:%s:%s" % (self.home, res.reference))["Layers"], want_layers)
        # docker-archive names layers by diff_id (the uncompressed digest), as docker save does.
        self.assertEqual(self.inspect("docker-archive:" + archive)["Layers"],
                         json.loads(img.config)["rootfs"]["diff_ids"])
        # skopeo reads every byte of the archive when it copies it.
        dest = os.path.join(self.home, "copied")
        proc = subprocess.run([SKOPEO, "--insecure-policy", "copy", "-q", "docker-archive:" + archive,
                               "oci:%s:x" % dest], stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)

    @unittest.skipUnless(shutil.which("podman"), "needs podman (Debian: podman); .ci/run installs it")
    def test_podman_loads_docker_archive(self):
        reg = self.registry()
        img = reg.push("pod/app", "v2", Image())
        archive = os.path.join(self.home, "image.tar")
        self.pull(reg, "pod/app:v2", docker_archive=archive)
        store = tempfile.mkdtemp(prefix="rp-podman-")
        self.addCleanup(shutil.rmtree, store, True)
        base = ["podman", "--root", os.path.join(store, "root"), "--runroot", os.path.join(store, "run"),
                "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs", "--events-backend", "none"]
        proc = subprocess.run(base + ["load", "-i", archive], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              timeout=120)
        if proc.returncode != 0 and b"newuidmap" in proc.stderr + proc.stdout:
            self.skipTest("podman cannot run here without root: %s" % proc.stderr.decode()[-200:])
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertIn(("Loaded image: %s/pod/app:v2" % reg.host).encode(), proc.stdout)
        proc = subprocess.run(base + ["image", "inspect", "--format", "{{.Id}}", reg.host + "/pod/app:v2"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.stdout.decode().strip(), sha256(img.config)[7:])

    @unittest.skipUnless(UMOCI, "needs umoci (Debian: umoci); .ci/run installs it")
    def test_rootfs_matches_umoci(self):
        reg = self.registry()
        reg.push("umoci/app", "v1", layered_image(*ROOTFS_LAYERS))
        layout = os.path.join(self.home, "layout")
        ours = os.path.join(self.home, "ours")
        self.pull(reg, "umoci/app:v1", oci_layout=layout, rootfs=ours)
        bundle = os.path.join(self.home, "bundle")
        cmd = [UMOCI, "unpack"] + ([] if os.geteuid() == 0 else ["--rootless"]) + \
            ["--image", layout + ":v1", bundle]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        theirs = snapshot(os.path.join(bundle, "rootfs"))
        mine = snapshot(ours)
        self.assertIn("usr/lib/libfoo.so", theirs)
        self.assertNotIn("a/y", theirs)
        self.assertEqual(sorted(mine), sorted(theirs))
        for path in theirs:
            with self.subTest(case=path):
                self.assertEqual(mine[path], theirs[path])


@unittest.skipUnless(os.geteuid() == 0 and BUILDAH and UMOCI and BUSYBOX, NEED_BUILDAH)
class RealImageTests(TreeAssertions, Base):
    """Images built as users build them (buildah, a busybox base) extracted by registry_pull and
    by umoci, compared entry by entry, as root and as an unprivileged user (umoci --rootless).
    The vfs driver names every removed child with a whiteout; overlay writes opaque directories
    (`rm -rf /x && mkdir /x`) and breaks hard links it copies up, as Docker's overlay2 does."""

    layouts = {}  # driver -> (layout, tag), or why it could not be built
    build_seconds = {}

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        work = tempfile.mkdtemp(prefix="rp-buildah-")
        cls.addClassCleanup(shutil.rmtree, work, True)
        cls.addClassCleanup(_unmount_below, work)
        cls.layouts, cls.build_seconds = {}, {}
        for driver in ("vfs", "overlay"):
            workdir = os.path.join(work, driver)
            os.makedirs(workdir)
            try:
                layout, tag, seconds = buildah_layout(workdir, driver)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                if driver == "vfs":
                    raise  # vfs works wherever buildah does: its failure is a failure
                cls.layouts[driver] = "buildah's overlay driver does not work here: %s" % str(e)[-300:]
                continue
            cls.layouts[driver] = (layout, tag)
            cls.build_seconds[driver] = seconds
            shutil.rmtree(os.path.join(workdir, "storage"), ignore_errors=True)

    def built(self, driver):
        """The layout of ``driver``'s image, after checking its layers hold what it is meant to
        exercise (a newer buildah may diff differently)."""
        found = self.layouts.get(driver)
        if isinstance(found, str):
            self.skipTest(found)
        layout, tag = found
        layers = layer_members(layout, tag)
        self.assertEqual(len(layers), 4, "one layer for COPY and one per RUN (buildah build --layers)")
        world, rewrite, meta = layers[1:]
        self.assertTrue(world["fifo"].isfifo())
        self.assertEqual(world["suid"].mode & 0o7777, 0o4755)  # buildah's modes carry the type bits too
        self.assertEqual(world["owned-suid"].mode & 0o7777, 0o6750)
        self.assertEqual((world["owned-suid"].uid, world["owned-suid"].gid), (4242, 4243))
        self.assertEqual(world["home/u/f"].uid, 1000)
        self.assertTrue(world["hl/b"].islnk())
        self.assertIn(".wh.gone", rewrite)
        self.assertTrue(rewrite["opt/app"].issym() and rewrite["opt/app"].linkname == "/opt/app-1")
        self.assertTrue(rewrite["d2f"].isreg())
        self.assertIn("real/through", rewrite)  # written through the absolute symlink /link
        self.assertTrue(meta["real"].issym() and meta["link"].isdir())
        self.assertEqual(meta["shared"].mode & 0o7777, 0o2770)
        if driver == "overlay":
            self.assertIn("x/.wh..wh..opq", rewrite)  # rm -rf /x && mkdir /x: an opaque directory
            self.assertTrue(rewrite["x"].isdir())      # ... whose own entry comes first
            self.assertTrue(rewrite["hl/c"].islnk())
        else:
            self.assertIn("x/.wh.sub", rewrite)
        return layout, tag

    def check_reference(self, driver, entries, groups, owners):
        """umoci's tree is what the Containerfile says (two equally wrong trees must still fail)."""
        self.assertNotIn("gone", entries)
        self.assertEqual(entries["opt/app"]["target"], "/opt/app-1")
        self.assertEqual(entries["opt/app-1"]["mode"], "0700")
        self.assertEqual(entries["opt/app-1/bin/run"]["type"], "file")
        self.assertEqual(entries["d2f"]["type"], "file")
        self.assertEqual(entries["f2d/now"]["mode"], "0705")
        self.assertEqual(sorted(p for p in entries if p.startswith("x/")), ["x/new"])
        self.assertEqual(entries["suid"]["mode"], "4711")
        self.assertEqual(entries["sgid"]["mode"], "2711")
        self.assertEqual(entries["owned-suid"]["mode"], "6750")
        self.assertEqual(entries["shared"]["mode"], "2770")
        self.assertEqual(entries["tmp"]["mode"], "1777")
        self.assertEqual(entries["keep"]["mode"], "0555")
        self.assertEqual(entries["fifo"]["type"], "fifo")
        self.assertEqual((entries["run/fifo2"]["type"], entries["run/fifo2"]["mode"]), ("fifo", "0600"))
        self.assertEqual(entries["run/pid"]["type"], "file")  # written through var/run -> /run
        self.assertNotIn("real/through", entries)  # /real became a symlink in the last layer
        self.assertEqual(entries["real"]["target"], "/opt/app-1/bin")
        self.assertEqual(entries["opt/app-1/bin/via-link"]["type"], "file")
        self.assertEqual(entries["link/dir-now"]["type"], "file")
        self.assertEqual(entries["hl/a"]["size"], 7)
        if driver == "overlay":  # hl/a was copied up: hl/b keeps the old inode and bytes
            self.assertEqual(groups, [["hl/a", "hl/c"]])
            self.assertEqual(entries["hl/b"]["size"], 2)
        else:
            self.assertEqual(groups, [["hl/a", "hl/b", "hl/c"]])
        if owners:
            self.assertEqual(entries["home/u/f"]["owner"], "1000:1001")
            self.assertEqual(entries["home/u/l"]["owner"], "1002:1003")
            self.assertEqual(entries["owned-suid"]["owner"], "4242:4243")
            self.assertEqual(entries["suid"]["owner"], "4242:4243")
            self.assertEqual(entries["shared"]["owner"], "2000:2001")

    def compare_as_root(self, driver):
        layout, tag = self.built(driver)
        reg = self.registry()
        push_layout(reg, layout, tag, "real/" + driver)
        ours = os.path.join(self.home, "ours")
        try:
            rp.pull("%s/real/%s:%s" % (reg.host, driver, tag), home=self.home, rootfs=ours)
        except rp.PullError as e:
            self.fail("registry_pull failed where umoci succeeds: %s (exit %d)" % (e, e.exit_code))
        theirs = self.umoci_tree(layout, tag, os.path.join(self.home, "bundle"))
        self.check_reference(driver, theirs[0], theirs[1], owners=True)
        self.assertSameTree(tree(ours), theirs)
        # One flattened tar of the same image: GNU tar -x of it gives umoci's tree as well.
        flat = os.path.join(self.home, "flat.tar")
        rp.pull("%s/real/%s:%s" % (reg.host, driver, tag), home=self.home, tar=flat)
        unpacked = os.path.join(self.home, "from-tar")
        os.makedirs(unpacked)
        # -P: GNU tar otherwise makes absolute symlinks last, after their directory's time was set.
        proc = subprocess.run(["tar", "-xpPf", flat, "-C", unpacked, "--numeric-owner", "--xattrs",
                               "--xattrs-include=*"], stderr=subprocess.PIPE)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertSameTree(tree(unpacked), theirs)

    def compare_unprivileged(self, driver):
        """registry_pull and umoci --rootless, each run as nobody; all but ownership must agree."""
        if not SETPRIV:
            self.skipTest("needs setpriv (util-linux) to run as an unprivileged user")
        layout, tag = self.built(driver)
        reg = self.registry()
        push_layout(reg, layout, tag, "real/" + driver)
        work = tempfile.mkdtemp(prefix="rp-nobody-")
        self.addCleanup(shutil.rmtree, work, True)
        shutil.copytree(layout, os.path.join(work, "layout"))
        for dirpath, dirnames, filenames in os.walk(work):
            for path in [dirpath] + [os.path.join(dirpath, n) for n in dirnames + filenames]:
                os.lchown(path, NOBODY, NOBODY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "LC_ALL": "C.UTF-8",
               "DOCKER_CONFIG": os.path.join(work, "no-docker"), "REGISTRY_AUTH_FILE": "", "XDG_RUNTIME_DIR": ""}
        as_nobody = [SETPRIV, "--reuid=%d" % NOBODY, "--regid=%d" % NOBODY, "--clear-groups", "--"]
        # The test's interpreter or module may live where nobody cannot read (/root/.pyenv, a
        # 0700 checkout): run a copy of the module with the first Python nobody can run.
        script = os.path.join(work, "registry_pull.py")
        shutil.copy(os.path.abspath(rp.__file__), script)
        os.chown(script, NOBODY, NOBODY)
        for python in (sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"):
            probe = subprocess.run(as_nobody + [python, script, "--version"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=env, timeout=60)
            if probe.returncode == 0:
                break
        else:
            self.skipTest("no Python that nobody may run: %s" % probe.stdout.decode(errors="replace")[-200:])
        ours = os.path.join(work, "ours")
        proc = subprocess.run(as_nobody + [python, script, "-q", "--home", os.path.join(work, "home"),
                                           "--rootfs", ours, "%s/real/%s:%s" % (reg.host, driver, tag)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=120)
        self.assertEqual(proc.returncode, 0, "registry_pull as nobody: %s" % proc.stderr.decode(errors="replace"))
        bundle = os.path.join(work, "bundle")
        _run(as_nobody + [UMOCI, "unpack", "--rootless", "--image", "%s:%s" % (os.path.join(work, "layout"), tag),
                          bundle], "umoci unpack --rootless (as nobody)", env=env)
        theirs = tree(os.path.join(bundle, "rootfs"), owners=False)
        self.check_reference(driver, theirs[0], theirs[1], owners=False)
        self.assertSameTree(tree(ours, owners=False), theirs)
        st = os.lstat(os.path.join(ours, "suid"))
        self.assertEqual((st.st_uid, st.st_gid), (NOBODY, NOBODY))  # not root: nothing chowned
        # --owners=xattr as nobody: each entry's record is what umoci as root gives the same entry.
        recorded = os.path.join(work, "recorded")
        proc = subprocess.run(as_nobody + [python, script, "-q", "--home", os.path.join(work, "home"),
                                           "--owners", "xattr", "--rootfs", recorded,
                                           "%s/real/%s:%s" % (reg.host, driver, tag)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, timeout=120)
        self.assertEqual(proc.returncode, 0, "--owners=xattr as nobody: %s" % proc.stderr.decode(errors="replace"))
        as_root = self.umoci_tree(layout, tag, os.path.join(self.home, "root-bundle"))[0]
        kinds = {"file": "file", "dir": "dir", "fifo": "pipe", "socket": "socket"}
        checked = 0
        for rel, entry in as_root.items():
            path = os.path.join(recorded, rel)
            if entry["type"] == "symlink":
                self.assertNotIn("user.containers.override_stat", os.listxattr(path, follow_symlinks=False))
                continue
            record = os.getxattr(path, "user.containers.override_stat", follow_symlinks=False).decode()
            uid_gid, _, rest = record.rpartition(":")[0], None, record.rsplit(":", 1)[1]
            want_type = kinds.get(entry["type"], entry["type"])
            self.assertEqual(record, "%s:%04o:%s" % (entry["owner"], int(entry["mode"], 8), want_type) if
                             not want_type.startswith(("char", "block")) else record, rel)
            checked += 1
        self.assertGreater(checked, 20)

    def test_vfs_image_as_root(self):
        self.compare_as_root("vfs")

    def test_vfs_image_unprivileged(self):
        self.compare_unprivileged("vfs")

    def test_overlay_image_as_root(self):
        self.compare_as_root("overlay")

    def test_overlay_image_unprivileged(self):
        self.compare_unprivileged("overlay")


@unittest.skipUnless(REGISTRY_BIN and SKOPEO, NEED_REAL)
class SkopeoComparisonTests(Base):
    def skopeo_json(self, *args):
        proc = subprocess.run([SKOPEO] + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return json.loads(proc.stdout)

    def test_list_tags_across_pages(self):
        dist = Distribution(self)
        dist.push("tags/app", [Image()], tag="t0")
        for i in range(1, 7):
            proc = subprocess.run([SKOPEO, "--insecure-policy", "copy", "-q", "--src-tls-verify=false",
                                   "--dest-tls-verify=false", "docker://%s/tags/app:t0" % dist.host,
                                   "docker://%s/tags/app:t%d" % (dist.host, i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            self.assertEqual(proc.returncode, 0, proc.stderr)
        tags = rp.list_tags(dist.host + "/tags/app", page_size=3)  # 3 pages
        self.assertEqual(sorted(tags), ["t%d" % i for i in range(7)])
        code, out, err = self.main("--home", self.home, "--list-tags", "--json", dist.host + "/tags/app")
        self.assertEqual(code, 0, err)
        theirs = self.skopeo_json("list-tags", "--tls-verify=false", "docker://%s/tags/app" % dist.host)
        self.assertEqual(sorted(json.loads(out)["Tags"]), sorted(theirs["Tags"]))
        code, out, err = self.main("--home", self.home, "--list-tags", dist.host + "/tags/app")
        self.assertEqual(sorted(out.split()), sorted(theirs["Tags"]))

    def test_inspect_an_index_with_attestations_as_skopeo_does(self):
        dist = Distribution(self)
        images = [Image("amd64"), Image("arm64", "v8")]
        dist.push("insp/app", images, with_index=True)
        ref = dist.host + "/insp/app:v1"
        for arch, variant, img in (("amd64", "", images[0]), ("arm64", "v8", images[1])):
            with self.subTest(case=arch):
                plat = "linux/%s" % arch + ("/" + variant if variant else "")
                code, out, err = self.main("--home", self.home, "--inspect", "--json", "--platform", plat, ref)
                self.assertEqual(code, 0, err)
                ours = json.loads(out)
                args = ["inspect", "--tls-verify=false", "--override-os", "linux", "--override-arch", arch]
                if variant:
                    args += ["--override-variant", variant]
                theirs = self.skopeo_json(*(args + ["docker://" + ref]))
                # skopeo 1.9 (Debian 12) prints no LayersData and no Variant; newer ones do.
                fields = [f for f in ("Name", "Digest", "Architecture", "Os", "Variant", "Created", "Layers",
                                      "LayersData", "Env", "Labels") if f in theirs]
                self.assertGreaterEqual(len(fields), 8, fields)
                for field in fields:
                    self.assertEqual(ours.get(field), theirs.get(field), field)
                self.assertEqual(ours["ManifestDigest"], img.digest)
                kinds = [m.get("Kind", "image") for m in ours["Index"]["Manifests"]]
                self.assertEqual(sorted(kinds), ["attestation-manifest"] * 2 + ["image"] * 2)
                self.assertEqual([m["Digest"] for m in ours["Index"]["Manifests"] if m["Chosen"]], [img.digest])
                sizes = [m["Size"] for m in ours["Index"]["Manifests"] if "Size" in m]
                self.assertEqual(sorted(sizes), sorted(i.size for i in images))
        stored = set(os.listdir(os.path.join(self.home, "blobs", "sha256")))
        for img in images:  # manifests and configs only: not one layer
            self.assertIn(img.digest.split(":")[1], stored)
            self.assertIn(sha256(img.config).split(":")[1], stored)
            for layer in img.layers:
                self.assertNotIn(sha256(layer).split(":")[1], stored)

    def test_platform_all_writes_the_registrys_index_as_skopeo_copy_all_does(self):
        dist = Distribution(self)
        images = [Image("amd64"), Image("arm64", "v8")]
        dist.push("all/app", images, with_index=True)
        ref = dist.host + "/all/app:v1"
        ours = os.path.join(self.home, "ours")
        code, out, err = self.main("--home", self.home, "--json", "--platform", "all", "--oci-layout", ours + ":v1",
                                   ref)
        self.assertEqual(code, 0, err)
        doc = json.loads(out)
        self.assertEqual(sorted(i["manifest_digest"] for i in doc["images"]), sorted(i.digest for i in images))
        theirs = os.path.join(self.home, "theirs")
        proc = subprocess.run([SKOPEO, "--insecure-policy", "copy", "-q", "--all", "--src-tls-verify=false",
                               "docker://" + ref, "oci:%s:v1" % theirs], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        with open(os.path.join(ours, "index.json")) as f, open(os.path.join(theirs, "index.json")) as g:
            self.assertEqual(json.load(f)["manifests"][0]["digest"], json.load(g)["manifests"][0]["digest"])
        self.assertEqual(sorted(os.listdir(os.path.join(ours, "blobs", "sha256"))),
                         sorted(os.listdir(os.path.join(theirs, "blobs", "sha256"))))  # attestations too
        for arch, img in (("amd64", images[0]), ("arm64", images[1])):
            with self.subTest(case=arch):
                raw = subprocess.run([SKOPEO, "inspect", "--raw", "--override-arch", arch, "oci:%s:v1" % ours],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
                self.assertEqual(raw.returncode, 0, raw.stderr)
                cfg = self.skopeo_json("inspect", "--config", "--override-arch", arch, "oci:%s:v1" % ours)
                self.assertEqual(cfg["architecture"], arch)
        self.assertEqual(sorted(r[0] for r in self.image_rows()), [dist.host + "/all/app:v1"] * 2)
        rp.collect_garbage(home=self.home, partial_age=0)  # the attestations belong to the image
        self.assertEqual(sorted(os.listdir(os.path.join(self.home, "blobs", "sha256"))),
                         sorted(os.listdir(os.path.join(theirs, "blobs", "sha256"))))

    def test_a_list_of_platforms_gets_a_new_index_of_what_was_pulled(self):
        dist = Distribution(self)
        images = [Image("amd64"), Image("arm64", "v8"), Image("arm", "v7")]
        dist.push("two/app", images, with_index=True)
        layout = os.path.join(self.home, "layout")
        code, out, err = self.main("--home", self.home, "--json", "--platform", "linux/arm64", "--platform",
                                   "linux/amd64", "--oci-layout", layout + ":v1", dist.host + "/two/app:v1")
        self.assertEqual(code, 0, err)
        with open(os.path.join(layout, "index.json")) as f:
            entry = json.load(f)["manifests"][0]
        with open(os.path.join(layout, "blobs", "sha256", entry["digest"].split(":")[1]), "rb") as f:
            index = json.loads(f.read())
        self.assertEqual([m["digest"] for m in index["manifests"]], [images[1].digest, images[0].digest])
        for arch in ("amd64", "arm64"):
            cfg = self.skopeo_json("inspect", "--config", "--override-arch", arch, "oci:%s:v1" % layout)
            self.assertEqual(cfg["architecture"], arch)
        code, out, err = self.main("--home", self.home, "--platform", "linux/arm64", "--platform", "linux/amd64",
                                   "--rootfs", os.path.join(self.home, "r"), dist.host + "/two/app:v1")
        self.assertEqual(code, 2, err)
        self.assertIn("exactly one platform", err)


if __name__ == "__main__":
    unittest.main()


@unittest.skipUnless(REGISTRY_BIN and SKOPEO, NEED_REAL)
class CutUploadDistributionTests(Base):
    """A cut in the middle of an upload to the real Distribution 2.8 (which keeps nothing of a cut
    body: 404 on the session, or a "0-0" range): the blob starts again, the digest is right."""

    def cut_copy(self, which, chunk_size):
        if not REGISTRY_BIN:
            self.skipTest("docker-registry is needed")
        dist = Distribution(self)
        relay = CuttingRelay(self, dist.host, which)
        img = Image(layers=[make_layer({"big": os.urandom(300000)}), make_layer({"s": b"small"})])
        layout = os.path.join(self.home, "layout")
        write_oci_layout(layout, "v1", [img])
        res = rp.copy("oci:%s:v1" % layout, relay.host + "/cut/app:v1", home=self.home, chunk_size=chunk_size,
                      jobs=1)
        self.assertTrue(relay.cut, relay.lines)
        self.assertEqual(res["digest"], img.digest)
        pulled = rp.pull(dist.host + "/cut/app:v1", home=os.path.join(self.home, "again"), platform="linux/amd64")
        self.assertEqual([x.digest for x in pulled.layers], [sha256(b) for b in img.layers])
        return relay

    def test_a_cut_monolithic_put_starts_again(self):
        relay = self.cut_copy(lambda line: line.startswith("PUT") and "digest=" in line, rp.CHUNK_SIZE)
        self.assertGreaterEqual(len([ln for ln in relay.lines if ln.startswith("POST")]), 3)

    def test_a_cut_first_chunk_starts_again(self):
        relay = self.cut_copy(lambda line: line.startswith("PATCH"), 65536)
        self.assertTrue([ln for ln in relay.lines if ln.startswith("GET") and "/uploads/" in ln], relay.lines)


class CopyReferrersTests(Base):
    def test_referrers_go_along_into_a_registry_without_the_api(self):
        """copy --referrers into Distribution 2.8 (no referrers API): the signature and the SBOM go
        along, the sha256-HEX referrers index is written, and the signature verifies there."""
        if not REGISTRY_BIN:
            self.skipTest("docker-registry is needed")
        keys = Keys(self)
        key, pub = keys.pair()
        reg = self.registry()
        img = reg.push("ref/app", "v1", Image())
        subject = {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest)}
        sbom = push_artifact(reg, "ref/app", None, Artifact({"sbom.json": b"{}"}, subject=subject,
                                                           artifact_type="application/spdx+json"))
        referrers_api(reg)
        sig, _ = keys.cosign(reg, "ref/app", img.digest, key, reg.host + "/ref/app")
        dist = Distribution(self)
        code, out, err = self.main("copy", "--home", self.home, "--platform", "linux/amd64", "--referrers", "--json",
                                   reg.host + "/ref/app:v1", dist.host + "/team/prod:v1")
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(json.loads(out)["referrers"]), sorted([sbom.digest, sig]))
        found = rp.referrers(dist.host + "/team/prod:v1")
        self.assertEqual(sorted(d.digest for d in found), sorted([sbom.digest, sig]))
        code, out, err = self.main("--home", os.path.join(self.home, "other"), "--platform", "linux/amd64",
                                   "--verify-key", pub, "--signed-identity", reg.host + "/ref/app",
                                   dist.host + "/team/prod:v1")
        self.assertEqual(code, 0, err)


class CopyDistributionTests(Base):
    """copy between real Distribution registries; skopeo reads back what was written."""

    def raw(self, ref, *extra):
        proc = subprocess.run([SKOPEO, "inspect", "--raw", "--tls-verify=false", *extra, "docker://" + ref],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return proc.stdout

    def test_copy_between_two_distributions_whole_and_chunked(self):
        a, b = Distribution(self), Distribution(self, access_log=True)
        img = Image()
        a.push("src/app", [img])
        res = rp.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", home=self.home)
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(sorted(res["uploaded"]), sorted(img.blobs()))
        self.assertEqual(self.raw(b.host + "/dst/app:v1"), self.raw(a.host + "/src/app:v1"))
        self.assertEqual(self.raw(b.host + "/dst/app:v1"), img.manifest)
        self.assertEqual(b.requests("PATCH"), [])
        # In 64 KiB chunks (the 200 KB layer), into another repository: Distribution's own PATCH handling.
        res = rp.copy(a.host + "/src/app:v1", b.host + "/chunked/app:v1", home=self.home, chunk_size=65536)
        self.assertEqual(sorted(res["uploaded"]), sorted(img.blobs()))
        patches = b.requests("PATCH", "/v2/chunked/app/blobs/uploads/")
        self.assertGreaterEqual(len(patches), 3)
        self.assertEqual(set(status for _, _, status in patches), {202})
        self.assertEqual(self.raw(b.host + "/chunked/app:v1"), img.manifest)
        pulled = rp.pull(b.host + "/chunked/app:v1", home=os.path.join(self.home, "check"), platform="linux/amd64")
        self.assertEqual(pulled.manifest_digest, img.digest)  # every blob read back and verified

    def test_all_copies_an_attested_index_byte_for_byte(self):
        a, b = Distribution(self), Distribution(self)
        images = [Image("amd64"), Image("arm64", "v8"), Image("arm", "v7")]
        a.push("multi/app", images, with_index=True)
        source = self.raw(a.host + "/multi/app:v1")
        res = rp.copy(a.host + "/multi/app:v1", b.host + "/multi/copy:v1", home=self.home, all_platforms=True)
        self.assertEqual(res["digest"], sha256(source))
        self.assertEqual(self.raw(b.host + "/multi/copy:v1"), source)
        children = json.loads(source)["manifests"]
        self.assertEqual(len([c for c in children if c["platform"]["os"] == "unknown"]), len(images))
        for child in children:
            self.assertEqual(self.raw("%s/multi/copy@%s" % (b.host, child["digest"])),
                             self.raw("%s/multi/app@%s" % (a.host, child["digest"])))
        for plat, img in zip(("linux/amd64", "linux/arm64", "linux/arm/v7"), images):
            res = rp.pull(b.host + "/multi/copy:v1", home=os.path.join(self.home, "check"), platform=plat)
            self.assertEqual(res.manifest_digest, img.digest)

    def test_shared_layers_are_skipped_and_another_repository_mounts(self):
        a, b = Distribution(self), Distribution(self, access_log=True)
        base = make_layer({"etc/base": os.urandom(5000)})
        first = Image(layers=[base, make_layer({"app/one": os.urandom(4000)})])
        second = Image(layers=[base, make_layer({"app/two": os.urandom(4000)})])
        a.push("src/one", [first])
        a.push("src/two", [second])
        rp.copy(a.host + "/src/one:v1", b.host + "/dst/app:v1", home=self.home)
        mark = len(b.requests())
        res = rp.copy(a.host + "/src/two:v1", b.host + "/dst/app:v2", home=self.home)
        shared = sha256(base[0])
        self.assertEqual(res["skipped"], [shared])
        self.assertEqual(sorted(res["uploaded"]), sorted(set(second.blobs()) - {shared}))
        posts = [p for m, p, s in b.requests()[mark:] if m == "POST" and "/v2/dst/app/blobs/uploads/" in p]
        self.assertEqual(len(posts), 2)  # the new config and layer
        self.assertEqual(self.raw(b.host + "/dst/app:v2"), second.manifest)
        # Within B, to another repository: every blob mounted, nothing uploaded.
        mark = len(b.requests())
        res = rp.copy(b.host + "/dst/app:v1", b.host + "/other/app:v1", home=self.home)
        self.assertEqual(sorted(res["mounted"]), sorted(first.blobs()))
        self.assertEqual((res["uploaded"], res["skipped"]), ([], []))
        mounts = [(p, s) for m, p, s in b.requests()[mark:] if m == "POST" and "mount=" in p]
        self.assertEqual([s for _, s in mounts], [201] * len(first.blobs()))
        self.assertEqual([m for m, p, s in b.requests()[mark:] if m in ("PATCH", "PUT") and "/blobs/" in p], [])
        self.assertEqual(self.raw(b.host + "/other/app:v1"), first.manifest)

    @unittest.skipUnless(OPENSSL and HTPASSWD, "needs openssl and htpasswd (apache2-utils)")
    def test_destination_with_tls_and_htpasswd(self):
        certs = tempfile.mkdtemp(prefix="rp-certs-")
        self.addCleanup(shutil.rmtree, certs, True)
        tls = make_ca(certs)
        htpasswd = os.path.join(certs, "htpasswd")
        subprocess.run([HTPASSWD, "-Bbc", htpasswd, "alice", "s3cret"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        a, b = Distribution(self), Distribution(self, tls=tls, htpasswd=htpasswd)
        img = Image()
        a.push("src/app", [img])
        with self.assertRaises(rp.AuthError):
            rp.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", home=self.home, ca_file=tls[0])
        res = rp.copy(a.host + "/src/app:v1", b.host + "/dst/app:v1", home=self.home, ca_file=tls[0],
                      username="alice", password="s3cret")
        self.assertEqual(res["digest"], img.digest)
        self.assertEqual(self.raw(b.host + "/dst/app:v1", "--creds", "alice:s3cret"), img.manifest)


def client_pair(ca_dir, name="client"):
    """A client certificate (NAME.cert, NAME.key) signed by make_ca's CA in ``ca_dir``."""
    def run(*args):
        subprocess.run(["openssl"] + list(args), check=True, cwd=ca_dir, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    with open(os.path.join(ca_dir, "client.ext"), "w") as f:
        f.write("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\n")
    run("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key", "-out", name + ".csr",
        "-subj", "/CN=rp test client")
    run("x509", "-req", "-in", name + ".csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", name + ".cert", "-days", "2", "-extfile", "client.ext")
    return os.path.join(ca_dir, name + ".cert"), os.path.join(ca_dir, name + ".key")


class CertsDirTests(Base):
    """TLS as registries are configured: certs.d/HOST:PORT with CAs and a client pair (mTLS)."""

    def fill(self, directory, tls, cert, key):
        os.makedirs(directory)
        shutil.copy(tls[0], os.path.join(directory, "ca.crt"))
        shutil.copy(cert, os.path.join(directory, "client.cert"))
        shutil.copy(key, os.path.join(directory, "client.key"))
        return directory

    def test_client_certificate_from_certs_d_and_cert_dir(self):
        if not REGISTRY_BIN or not OPENSSL or not SKOPEO:
            self.skipTest("docker-registry, skopeo and openssl are needed")
        ca_dir = tempfile.mkdtemp(prefix="rp-ca-")
        self.addCleanup(shutil.rmtree, ca_dir, True)
        tls = make_ca(ca_dir)
        cert, key = client_pair(ca_dir)
        dist = Distribution(self, tls=tls, client_ca=tls[0])
        own = self.fill(os.path.join(self.home, "own-certs"), tls, cert, key)
        img = Image()
        dist.push("m/app", [img], cert_dir=own)
        ref = dist.host + "/m/app:v1"
        # No client pair: refused at the handshake (a CA alone is not enough).
        code, out, err = self.main(*self.cli_args("--ca-file", tls[0], ref))
        self.assertNotEqual(code, 0, err)
        self.assertEqual(self.image_rows(), [])
        # certs.d/HOST:PORT under $XDG_CONFIG_HOME/containers: its CA and pair, no --ca-file.
        config = os.path.join(self.home, "xdg")
        self.fill(os.path.join(config, "containers", "certs.d", dist.host), tls, cert, key)
        old = os.environ.get("XDG_CONFIG_HOME")
        os.environ["XDG_CONFIG_HOME"] = config
        self.addCleanup(self._restore_env, "XDG_CONFIG_HOME", old)
        code, out, err = self.main(*self.cli_args(ref))
        self.assertEqual(code, 0, err)
        self.assertStoreHas(img)
        # --cert-dir replaces the lookup; a .cert without its .key is a usage error.
        del os.environ["XDG_CONFIG_HOME"]
        code, out, err = self.main("inspect", "--json", "--cert-dir", own, ref)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["Digest"], img.digest)
        os.unlink(os.path.join(own, "client.key"))
        code, out, err = self.main("inspect", "--cert-dir", own, ref)
        self.assertEqual(code, 2, err)
        self.assertIn("client.key", err)


class ArtifactDistributionTests(Base):
    """Artifacts, a cosign signature and a referrer on the real Distribution registry (2.8: no
    referrers API, so the pusher writes the sha256-HEX referrers index, as such a client must)."""

    def test_artifacts_signatures_and_referrers_through_distribution(self):
        if not REGISTRY_BIN or not SKOPEO:
            self.skipTest("docker-registry and skopeo are needed")
        keys = Keys(self)
        key, pub = keys.pair()
        dist = Distribution(self)
        img = Image()
        dist.push("team/prod", [img])
        subject = {"mediaType": rp.MT_OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest)}
        chart_config = json.dumps({"name": "demo", "version": "0.1.0", "apiVersion": "v2"}).encode()
        helm = Artifact({"demo-0.1.0.tgz": os.urandom(5000)}, config=chart_config,
                        config_type="application/vnd.cncf.helm.config.v1+json",
                        layer_type="application/vnd.cncf.helm.chart.content.v1.tar+gzip", with_artifact_type=False)
        oci11 = Artifact({"notes.txt": b"hello\n"}, artifact_type="application/vnd.example.notes.v1")
        sbom = Artifact({"sbom.spdx.json": b'{"spdxVersion": "SPDX-2.3"}'}, artifact_type="application/spdx+json",
                        subject=subject)
        # The cosign signature, in its own little registry first: its documents, then Distribution.
        shadow = Registry()
        sig_digest, sig_data = keys.cosign(shadow, "team/prod", img.digest, key, "%s/team/prod" % dist.host)
        referrers_index = json.dumps({"schemaVersion": 2, "mediaType": rp.MT_OCI_INDEX,
                                      "manifests": [sbom.descriptor()]}).encode()
        blobs = dict(helm.blobs())
        blobs.update(oci11.blobs())
        blobs.update(sbom.blobs())
        blobs.update(dict((d, b) for d, b in shadow.blobs.items()))
        sig_tag = img.digest.replace(":", "-") + ".sig"
        push_documents(dist.host, "team/prod", blobs, [
            ("chart", rp.MT_OCI_MANIFEST, helm.manifest), ("notes", rp.MT_OCI_MANIFEST, oci11.manifest),
            (sbom.digest, rp.MT_OCI_MANIFEST, sbom.manifest), (sig_tag, rp.MT_OCI_MANIFEST, sig_data),
            (img.digest.replace(":", "-"), rp.MT_OCI_INDEX, referrers_index)])
        # Artifacts: pulled, inspected, raw-printed, written to a layout skopeo reads.
        for tag, art, kind in (("chart", helm, "application/vnd.cncf.helm.config.v1+json"),
                               ("notes", oci11, "application/vnd.example.notes.v1")):
            with self.subTest(artifact=tag):
                layout = os.path.join(self.home, "layout-" + tag)
                out_dir = os.path.join(self.home, "out-" + tag)
                res = rp.pull("%s/team/prod:%s" % (dist.host, tag), home=self.home, oci_layout=layout + ":" + tag,
                              output=out_dir)
                self.assertEqual((res.manifest_digest, res.artifact_type), (art.digest, kind))
                self.assertEqual(sorted(os.listdir(out_dir)), sorted(art.files))
                code, out, err = self.main("inspect", "--raw", "--home", self.home, "%s/team/prod:%s" % (dist.host, tag))
                self.assertEqual((code, out.encode()), (0, art.manifest), err)
                proc = subprocess.run([SKOPEO, "inspect", "--raw", "oci:%s:%s" % (layout, tag)],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
                self.assertEqual(proc.returncode, 0, proc.stderr)
                self.assertEqual(proc.stdout, art.manifest)
        # The image, verified by its signature, with its referrers (tag schema and cosign tag).
        layout = os.path.join(self.home, "signed")
        code, out, err = self.main(*self.cli_args("--verify-key", pub, "--referrers", "--oci-layout",
                                                  layout + ":v1", dist.host + "/team/prod:v1"))
        self.assertEqual(code, 0, err)
        with open(os.path.join(layout, "index.json")) as f:
            entries = dict((e["digest"], e) for e in json.load(f)["manifests"])
        self.assertEqual(entries[sbom.digest]["artifactType"], "application/spdx+json")
        self.assertEqual(entries[sig_digest]["annotations"][rp._REF_NAME], sig_tag)
        code, out, err = self.main("inspect", "--json", "--home", self.home, dist.host + "/team/prod:v1")
        self.assertEqual(code, 0, err)
        self.assertEqual(sorted(r["Digest"] for r in json.loads(out)["Referrers"]), sorted([sbom.digest, sig_digest]))
        # The layout carries the signature on: skopeo copies it to a second registry, where it verifies.
        second = Distribution(self)
        for name in ("v1", sig_tag):
            proc = subprocess.run([SKOPEO, "--insecure-policy", "copy", "-q", "--dest-tls-verify=false",
                                   "oci:%s:%s" % (layout, name), "docker://%s/team/prod:%s" % (second.host, name)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
            self.assertEqual(proc.returncode, 0, proc.stderr)
        other_home = os.path.join(self.home, "second")
        code, out, err = self.main("--home", other_home, "--platform", "linux/amd64", "--verify-key", pub,
                                   "--signed-identity", dist.host + "/team/prod", second.host + "/team/prod:v1")
        self.assertEqual(code, 0, err)
        code, out, err = self.main("--home", other_home, "--platform", "linux/amd64", "--verify-key", pub,
                                   second.host + "/team/prod:v1")
        self.assertEqual(code, 8, err)  # signed for the first registry's name, not the second's
        self.assertIn("another repository", err)
