"""A loopback HTTP server that implements the Hub endpoints huggingface_hub 2.4 calls to download and upload.

It serves repositories from local folders and records every request, so tests
can run real huggingface_hub code against 127.0.0.1 instead of the Hub. Only
the endpoints surgeon reaches are implemented:

- GET  /api/models/{repo}[/revision/{rev}] repo_info
- GET  /api/models/{repo}/tree/{rev}       list_repo_tree (one page)
- HEAD /{repo}/resolve/{rev}/{file}        file metadata (X-Repo-Commit, ETag, Content-Length)
- GET  /{repo}/resolve/{rev}/{file}        file bytes, with single-range Range support
- POST /api/repos/create                   create_repo
- POST /api/validate-yaml                   model card metadata check (a stand-in, see card_metadata_errors)
- POST /api/models/{repo}/preupload/{rev}  upload modes: always "regular", so no LFS or Xet transfer
- POST /api/models/{repo}/commit/{rev}     NDJSON commit with base64 file contents
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


@dataclass
class ServedRepo:
    """A repository served from a local folder at one fixed commit."""

    folder: Path
    commit: str
    gated: bool = False

    def files(self) -> list[str]:
        return sorted(path.name for path in self.folder.iterdir() if path.is_file())


@dataclass
class HubServer:
    """Repositories to serve, what clients uploaded, and the log of requests as (method, path, range)."""

    repos: dict[str, ServedRepo] = field(default_factory=dict)
    uploaded: dict[str, dict[str, bytes]] = field(default_factory=dict)
    created: list[dict] = field(default_factory=list)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    validated: list[str] = field(default_factory=list)
    # When set, the server returns HTTP 403 for every upload commit, as for a token without write access.
    # (huggingface_hub retries 5xx responses with backoff, which would slow the tests by half a minute.)
    reject_commits: bool = False
    url: str = ""

    def start(self) -> None:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# The values https://huggingface.co/docs/hub/model-cards#specifying-a-base-model lists for base_model_relation.
BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
_HUB_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")


def card_metadata_errors(content: str) -> list[str]:
    """Return what is wrong with a model card's metadata: the YAML must parse, and the fields the Hub documents must have their documented types."""
    from huggingface_hub import ModelCard

    try:
        metadata = ModelCard(content, ignore_metadata_errors=False).data.to_dict()
    except ValueError as error:
        return [f"metadata does not parse: {error}"]
    errors = []
    tags = metadata.get("tags", [])
    if not isinstance(tags, list) or not all(isinstance(tag, str) for tag in tags):
        errors.append("tags must be a list of strings")
    base_models = metadata.get("base_model", [])
    base_models = [base_models] if isinstance(base_models, str) else base_models
    if not isinstance(base_models, list) or not all(isinstance(repo, str) and _HUB_REPO_ID.fullmatch(repo) for repo in base_models):
        errors.append("base_model must be a Hub model id or a list of them")
    relation = metadata.get("base_model_relation")
    if relation is not None and relation not in BASE_MODEL_RELATIONS:
        errors.append(f"base_model_relation must be one of {sorted(BASE_MODEL_RELATIONS)}")
    if relation is not None and not base_models:
        errors.append("base_model_relation needs base_model")
    return errors


def _etag(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args) -> None:  # noqa: A002 - signature fixed by BaseHTTPRequestHandler
        pass

    def do_HEAD(self) -> None:
        self._route("HEAD")

    def do_GET(self) -> None:
        self._route("GET")

    def do_POST(self) -> None:
        self._route("POST")

    def _route(self, method: str) -> None:
        path = unquote(urlparse(self.path).path)
        self.hub.requests.append((method, path, self.headers.get("Range")))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0)) if method == "POST" else b""

        if method == "POST" and path == "/api/repos/create":
            request = json.loads(body)
            self.hub.created.append(request)
            repo_id = f"{request.get('organization')}/{request['name']}" if request.get("organization") else request["name"]
            return self._json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id})
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body)["content"])
        match = re.fullmatch(r"/api/models/(.+?)/(revision|tree|preupload|commit)/([^/]+)", path)
        if match:
            repo_id, action, revision = match.groups()
            return getattr(self, f"_{action}")(repo_id, revision, body)
        match = re.fullmatch(r"/api/models/([^/]+/[^/]+|[^/]+)", path)
        if match and method == "GET":
            return self._revision(match.group(1), "main", body)
        match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
        if match:
            return self._resolve(method, *match.groups())
        self._error(404, "EntryNotFound", f"no route for {method} {path}")

    def _repo(self, repo_id: str) -> ServedRepo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif repo.gated:
            self._error(403, "GatedRepo", "Access to this repository is restricted")
            return None
        return repo

    def _revision(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        if revision not in ("main", repo.commit):
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        self._json({"id": repo_id, "sha": repo.commit, "private": False, "siblings": [{"rfilename": name} for name in repo.files()]})

    def _tree(self, repo_id: str, revision: str, body: bytes) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        entries = []
        for name in repo.files():
            data = (repo.folder / name).read_bytes()
            entries.append({"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()})
        self._json(entries)

    def _resolve(self, method: str, repo_id: str, revision: str, file_name: str) -> None:
        repo = self._repo(repo_id)
        if repo is None:
            return
        path = repo.folder / file_name
        if not path.is_file():
            return self._error(404, "EntryNotFound", f"{file_name} does not exist", {"X-Repo-Commit": repo.commit})
        data = path.read_bytes()
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{_etag(data)}"', "Accept-Ranges": "bytes"}
        status, payload = 200, data
        requested = self.headers.get("Range")
        if requested:
            start, _, stop = requested.removeprefix("bytes=").partition("-")
            first, last = int(start), min(int(stop) if stop else len(data) - 1, len(data) - 1)
            status, payload = 206, data[first : last + 1]
            headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(payload)

    def _validate_yaml(self, content: str) -> None:
        """Check the card metadata against the field rules in the Hub's model card docs. This is a stand-in, not the Hub's validator."""
        self.hub.validated.append(content)
        errors = [{"message": message} for message in card_metadata_errors(content)]
        payload = json.dumps({"errors": errors, "warnings": []}).encode()
        self.send_response(400 if errors else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _preupload(self, repo_id: str, revision: str, body: bytes) -> None:
        files = json.loads(body)["files"]
        self._json({"files": [{"path": entry["path"], "uploadMode": "regular", "shouldIgnore": False} for entry in files]})

    def _commit(self, repo_id: str, revision: str, body: bytes) -> None:
        if self.hub.reject_commits:
            return self._error(403, "Forbidden", "this token cannot write to the repository")
        stored = self.hub.uploaded.setdefault(repo_id, {})
        for line in body.splitlines():
            item = json.loads(line)
            if item["key"] == "file":
                stored[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
        commit = hashlib.sha1(body).hexdigest()
        self._json({"commitUrl": f"{self.hub.url}/{repo_id}/commit/{commit}", "commitOid": commit, "pullRequestUrl": None})

    def _json(self, data: object) -> None:
        payload = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, code: str, message: str, extra: dict | None = None) -> None:
        payload = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
