"""A local stand-in for Kaggle's API, driven through the official ``kaggle`` client in tests.

What the installed client (kaggle 2.x / kagglesdk) sends, and so what the stub serves on 127.0.0.1 (a
free port, a daemon thread). Every API call is a POST of JSON to ``/api/v1/<service>/<Method>`` with
HTTP basic auth (username:key); ``calls(<Method>)`` returns them.

File competitions, ``competition_submit``:

1. ``competitions.CompetitionApiService/StartSubmissionUpload`` with ``competitionName, fileName,
   contentLength, lastModifiedEpochSeconds``; reply ``{"token", "createUrl"}``.
2. PUT the file's bytes to ``createUrl`` (a signed storage URL in production: no auth header); any
   status but 200/201 makes the client return ``"Could not submit to competition"`` instead of raising.
3. ``.../CreateSubmission`` with ``competitionName, blobFileTokens, submissionDescription``; reply
   ``{"message", "ref"}``.

Code competitions:

- ``datasets create``/``version`` (``dataset_create_new``/``dataset_create_version``):
  ``datasets.DatasetApiService/GetDatasetStatus`` (404 for an unknown dataset), then per file
  ``blobs.BlobApiService/StartBlobUpload`` (``type, name, contentLength``) and its PUT, then
  ``.../CreateDataset`` (``ownerSlug, slug, title, files: [{token}], isPrivate``) or
  ``.../CreateDatasetVersion`` (``ownerSlug, datasetSlug, body: {versionNotes, files}``); reply
  ``{"ref", "url", "status": "ok"}`` or ``{"error"}``. ``dataset_states`` are what GetDatasetStatus
  answers for an existing dataset, one per call, the last one repeated.
- ``kernels push``: ``kernels.KernelsApiService/SaveKernel`` (``slug, text, language, kernelType,
  enableInternet, datasetDataSources, competitionDataSources, ...``); reply ``{"ref", "url",
  "versionNumber"}``. ``kernels status``: ``.../GetKernelSessionStatus`` (``userName, kernelSlug``)
  answers ``kernel_states`` in turn (``failureMessage`` with ``kernel_failure``).
- ``competitions submit -k -v``: ``competitions.CompetitionApiService/CreateCodeSubmission``
  (``competitionName, kernelOwner, kernelSlug, kernelVersion, fileName, submissionDescription``).

``.../ListSubmissions`` answers with the created submissions (status and public score settable).
Errors are JSON ``{"code", "message"}``, which the client turns into ``requests.HTTPError``.

The client picks its endpoint from ``KaggleApi.args`` (``--local`` when ``KAGGLE_API_ENVIRONMENT``
was ``LOCALHOST`` at import) and ``kagglesdk.kaggle_env._env_to_endpoint``; ``use_stub`` sets both
through ``monkeypatch``, so it works whether or not kaggle was imported earlier and undoes itself.
"""

from __future__ import annotations

import base64
import json
import tempfile
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

API_PREFIX = "/api/v1/"
UPLOAD_PREFIX = "/upload/"
STUB_USERNAME = "stub-user"
STUB_KEY = "stub-secret-key-0123456789abcdef"


@dataclass
class Recorded:
    method: str
    path: str
    endpoint: str  # "StartSubmissionUpload", "upload", "CreateSubmission", ...
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class Failure:
    status: int
    remaining: int | None  # None: every call
    retry_after: str | None = None


@dataclass
class KaggleStub:
    username: str = STUB_USERNAME
    key: str = STUB_KEY
    status: str = "COMPLETE"  # what ListSubmissions reports
    public_score: str | None = "0.53400"
    # CreateSubmission's reply; None is a normal success. E.g. {"message": "bad file"} (no ref).
    create_reply: dict[str, Any] | None = None
    requests: list[Recorded] = field(default_factory=list)
    uploads: dict[str, bytes] = field(default_factory=dict)
    submissions: list[dict[str, Any]] = field(default_factory=list)
    # Code competitions: dataset ref -> its versions (file name -> bytes); notebook ref -> its versions
    # (the SaveKernel request); what GetDatasetStatus and GetKernelSessionStatus answer, in turn.
    datasets: dict[str, list[dict[str, bytes]]] = field(default_factory=dict)
    kernels: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    dataset_states: list[str] = field(default_factory=lambda: ["READY"])
    kernel_states: list[str] = field(default_factory=lambda: ["RUNNING", "COMPLETE"])
    kernel_failure: str = ""
    blob_names: dict[str, str] = field(default_factory=dict)  # upload token -> file name
    _failures: dict[str, deque[Failure]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None

    # -------------------------------------------------------------- control

    def fail(self, endpoint: str, status: int, times: int | None = 1, retry_after: str | None = None) -> None:
        """Answer the next ``times`` calls of ``endpoint`` (``"upload"`` for the PUT) with ``status``;
        ``times=None`` fails every call."""
        self._failures.setdefault(endpoint, deque()).append(Failure(status, times, retry_after))

    def calls(self, endpoint: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.endpoint == endpoint]

    @property
    def url(self) -> str:
        assert self._server is not None, "stub not started"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> KaggleStub:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self))
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, name="kaggle-stub",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> KaggleStub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -------------------------------------------------------------- behaviour

    def injected_failure(self, endpoint: str) -> Failure | None:
        with self._lock:
            queue = self._failures.get(endpoint)
            if not queue:
                return None
            failure = queue[0]
            if failure.remaining is not None:
                failure.remaining -= 1
                if failure.remaining <= 0:
                    queue.popleft()
            return failure

    def authorised(self, headers: dict[str, str]) -> bool:
        expected = "Basic " + base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return headers.get("Authorization") == expected

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict[str, str], bytes]:
        endpoint = (path.rsplit("/", 1)[-1] if path.startswith(API_PREFIX) else "upload" if path.startswith(UPLOAD_PREFIX)
                    else path)
        with self._lock:
            self.requests.append(Recorded(method, path, endpoint, headers, body))
        if failure := self.injected_failure(endpoint):
            extra = {"Retry-After": failure.retry_after} if failure.retry_after is not None else {}
            return error(failure.status, f"stub: injected {failure.status} on {endpoint}", extra)
        if method == "PUT" and endpoint == "upload":
            return self.put_blob(path[len(UPLOAD_PREFIX):], body)
        if method != "POST" or not path.startswith(API_PREFIX):
            return error(404, f"stub: no route {method} {path}")
        if not self.authorised(headers):
            return error(401, "stub: unauthenticated")
        request = json.loads(body or b"{}")
        routes = {"StartSubmissionUpload": self.start_upload, "CreateSubmission": self.create_submission,
                  "ListSubmissions": self.list_submissions, "StartBlobUpload": self.start_blob_upload,
                  "GetDatasetStatus": self.dataset_status, "CreateDataset": self.create_dataset,
                  "CreateDatasetVersion": self.create_dataset_version, "SaveKernel": self.save_kernel,
                  "GetKernelSessionStatus": self.kernel_status, "CreateCodeSubmission": self.create_code_submission}
        if endpoint not in routes:
            return error(404, f"stub: no route {endpoint}")
        return routes[endpoint](request)

    def start_upload(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if not request.get("competitionName") or not request.get("fileName"):
            return error(400, "stub: competitionName and fileName are required")
        token = f"blob-token-{len(self.calls('StartSubmissionUpload'))}"
        return ok({"token": token, "createUrl": f"{self.url}{UPLOAD_PREFIX}{token}"})

    def put_blob(self, token: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
        with self._lock:
            self.uploads[token] = body
        return 200, {}, b""

    # -------------------------------------------------------------- code competitions

    def start_blob_upload(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if not request.get("name"):
            return error(400, "stub: name is required")
        token = f"blob-{len(self.calls('StartBlobUpload'))}"
        self.blob_names[token] = request["name"]
        return ok({"token": token, "createUrl": f"{self.url}{UPLOAD_PREFIX}{token}"})

    def uploaded_files(self, files: list[dict[str, Any]]) -> dict[str, bytes] | None:
        tokens = [f.get("token", "") for f in files]
        if not all(t in self.uploads for t in tokens):
            return None
        return {self.blob_names[t]: self.uploads[t] for t in tokens}

    def dataset_status(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        ref = f"{request.get('ownerSlug')}/{request.get('datasetSlug')}"
        if ref not in self.datasets:
            return error(404, f"stub: no dataset {ref}")
        with self._lock:
            state = self.dataset_states.pop(0) if len(self.dataset_states) > 1 else self.dataset_states[0]
        return ok({"status": state})

    def add_dataset_version(self, ref: str, files: list[dict[str, Any]]) -> tuple[int, dict[str, str], bytes]:
        uploaded = self.uploaded_files(files)
        if not uploaded:
            return error(400, f"stub: files of {ref} not uploaded")
        self.datasets.setdefault(ref, []).append(uploaded)
        return ok({"ref": ref, "url": f"https://www.kaggle.com/datasets/{ref}", "status": "ok"})

    def create_dataset(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        ref = f"{request.get('ownerSlug')}/{request.get('slug')}"
        if ref in self.datasets:
            return ok({"status": "error", "error": f"stub: {ref} exists"})
        return self.add_dataset_version(ref, request.get("files", []))

    def create_dataset_version(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        ref = f"{request.get('ownerSlug')}/{request.get('datasetSlug')}"
        if ref not in self.datasets:
            return error(404, f"stub: no dataset {ref}")
        return self.add_dataset_version(ref, request.get("body", {}).get("files", []))

    def save_kernel(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        ref = request.get("slug") or ""
        if ref.count("/") != 1 or not request.get("text"):
            return error(400, "stub: slug owner/name and text are required")
        versions = self.kernels.setdefault(ref, [])
        versions.append(request)
        return ok({"ref": ref, "url": f"https://www.kaggle.com/code/{ref}", "versionNumber": len(versions)})

    def kernel_status(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        ref, label = f"{request.get('userName')}/{request.get('kernelSlug')}", request.get("versionLabel")
        if ref not in self.kernels or (label and label != f"v{len(self.kernels[ref])}"):
            return error(404, f"stub: no notebook {ref} {label or ''}")
        with self._lock:
            state = self.kernel_states.pop(0) if len(self.kernel_states) > 1 else self.kernel_states[0]
        return ok({"status": state, **({"failureMessage": self.kernel_failure} if self.kernel_failure else {})})

    def create_code_submission(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        kernel = f"{request.get('kernelOwner')}/{request.get('kernelSlug')}"
        version = int(request.get("kernelVersion") or 0)
        if not 1 <= version <= len(self.kernels.get(kernel, [])):
            return error(400, f"stub: no version {version} of notebook {kernel}")
        ref = 40_000 + len(self.submissions) + 1
        self.submissions.append({"ref": ref, "description": request.get("submissionDescription", ""),
                                 "competition": request.get("competitionName"), "kernel": kernel, "version": version,
                                 "file_name": request.get("fileName")})
        return ok({"message": f"Successfully submitted to {request.get('competitionName')}", "ref": ref})

    def create_submission(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        token = request.get("blobFileTokens", "")
        if token not in self.uploads:
            return error(400, f"stub: no uploaded blob for token {token!r}")
        if self.create_reply is not None:
            return ok(self.create_reply)
        ref = 40_000 + len(self.submissions) + 1
        self.submissions.append({"ref": ref, "description": request.get("submissionDescription", ""),
                                 "competition": request.get("competitionName"), "bytes": self.uploads[token]})
        return ok({"message": f"Successfully submitted to {request.get('competitionName')}", "ref": ref})

    def list_submissions(self, request: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        subs = [{"ref": s["ref"], "description": s["description"], "fileName": "submission.csv",
                 "date": "2016-08-01T00:00:00.000Z", "status": self.status,
                 **({"publicScore": self.public_score} if self.public_score else {})}
                for s in reversed(self.submissions) if s["competition"] == request.get("competitionName")]
        return ok({"submissions": subs})


def ok(payload: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def error(status: int, message: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"code": status, "message": message}).encode()
    return status, {"Content-Type": "application/json", **(headers or {})}, body


def read_body(handler: BaseHTTPRequestHandler) -> bytes:
    if handler.headers.get("Transfer-Encoding", "").lower() == "chunked":
        chunks = []
        while size := int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16):
            chunks.append(handler.rfile.read(size))
            handler.rfile.readline()
        handler.rfile.readline()  # the blank line after the last chunk
        return b"".join(chunks)
    return handler.rfile.read(int(handler.headers.get("Content-Length") or 0))


def make_handler(stub: KaggleStub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            body = read_body(self)
            status, headers, payload = stub.handle(self.command, self.path, dict(self.headers.items()), body)
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        do_POST = do_PUT = do_GET = _serve

        def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
            pass

    return Handler


def use_stub(monkeypatch: Any, stub: KaggleStub, home: Path) -> None:
    """Point the official client at ``stub`` with the stub's fake credentials, isolated from any real
    Kaggle configuration (HOME and KAGGLE_CONFIG_DIR under ``home``); undone by ``monkeypatch``.

    kaggle is imported first, under the ambient environment, so the module state it keeps after the
    test (``kaggle.api``, ``KaggleApi.args``) is what any plain import would have given: nothing of
    the stub outlives the test. The env-var-before-import recipe itself is exercised in a subprocess
    (tests/test_submit.py)."""
    from kaggle.api.kaggle_api_extended import KaggleApi
    from kagglesdk.kaggle_env import KaggleEnv, _env_to_endpoint

    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "LOCALHOST")
    monkeypatch.setenv("KAGGLE_USERNAME", stub.username)
    monkeypatch.setenv("KAGGLE_KEY", stub.key)
    monkeypatch.delenv("KAGGLE_API_TOKEN", raising=False)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    monkeypatch.setitem(_env_to_endpoint, KaggleEnv.LOCAL, stub.url)
    # Class attributes computed at kaggle's import: the endpoint choice and the config file.
    monkeypatch.setattr(KaggleApi, "args", ["--local"])
    monkeypatch.setattr(KaggleApi, "config_dir", str(home / ".kaggle"))
    monkeypatch.setattr(KaggleApi, "config", str(home / ".kaggle" / "kaggle.json"))
    # The client keeps resumable-upload state in the temp folder; each test gets its own.
    (home / "tmp").mkdir(exist_ok=True)
    monkeypatch.setattr(tempfile, "tempdir", str(home / "tmp"))
