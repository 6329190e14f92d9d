"""The Kaggle client, used by ``ingest`` (download) and ``submit`` (upload): one credential check,
download, upload with retries on transient failures, the score lookup, and for code competitions the
models dataset, the notebook push, the waits for both and the submission from the notebook's output. ``import kaggle``
authenticates at import time and prints help when no credentials exist, so the official client is
imported lazily, only where it is called.

Credentials (kaggle 2.x): ``KAGGLE_API_TOKEN`` or ``~/.kaggle/access_token``; the legacy
``KAGGLE_USERNAME``/``KAGGLE_KEY`` or ``~/.kaggle/kaggle.json``. ``KAGGLE_CONFIG_DIR`` moves the folder.
"""

from __future__ import annotations

import email.utils
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import StageError

log = logging.getLogger(__name__)


MAX_RETRY_AFTER_S = 300.0


T = TypeVar("T")


class SubmitError(StageError):
    """The upload failed or was refused; nothing usable was submitted."""


# ---------------------------------------------------------------------------- upload


def http_status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


def is_retryable(err: BaseException) -> bool:
    """Rate limits, server errors and dropped connections are transient; other 4xx are not."""
    import requests

    status = http_status(err)
    if isinstance(err, requests.HTTPError) and status is not None:
        return status == 429 or status >= 500
    return isinstance(err, (requests.ConnectionError, requests.Timeout))


def retry_delay(err: BaseException, attempt: int, backoff_s: float) -> float:
    """Exponential backoff; a 429's Retry-After (seconds or HTTP date) wins when present."""
    response = getattr(err, "response", None)
    header = response.headers.get("Retry-After") if http_status(err) == 429 and response is not None else None
    if header:
        try:
            return min(max(0.0, float(header)), MAX_RETRY_AFTER_S)
        except ValueError:
            when = email.utils.parsedate_to_datetime(header) if header else None
            if when is not None:
                return min(max(0.0, (when - datetime.now(UTC)).total_seconds()), MAX_RETRY_AFTER_S)
    return backoff_s * 2**attempt


def describe(err: BaseException) -> str:
    status = http_status(err)
    return f"HTTP {status}: {err}" if status is not None else f"{type(err).__name__}: {err}"


def with_retries(action: Callable[[], T], max_retries: int, backoff_s: float,
                 sleep: Callable[[float], None] = time.sleep, what: str = "the submission") -> tuple[T, int]:
    """(result, attempts). Retries only transient failures (429, 5xx, dropped connections), at most
    ``max_retries`` times; a refused request (other 4xx) or a failed upload (``SubmitError``) is final.
    ``what`` names the request in messages."""
    for attempt in range(max_retries + 1):
        try:
            return action(), attempt + 1
        except SubmitError:
            raise
        except Exception as err:
            if not is_retryable(err):
                raise SubmitError(f"Kaggle refused {what} ({describe(err)}); not retried") from err
            if attempt == max_retries:
                raise SubmitError(f"{what}: gave up after {attempt + 1} attempts; last error {describe(err)}") from err
            delay = retry_delay(err, attempt, backoff_s)
            log.warning("%s: attempt %d/%d failed (%s); retrying in %.1fs", what, attempt + 1, max_retries + 1,
                        describe(err), delay)
            sleep(delay)
    raise AssertionError("unreachable")


def kaggle_api() -> Any:
    """The official client, authenticated. Imported here: ``import kaggle`` authenticates at import."""
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi

        api = KaggleApi()
        api.authenticate()
    except SystemExit:  # the client exits when it finds no usable credentials
        raise SubmitError("the kaggle client found no usable credentials") from None
    return api


def upload_once(api: Any, path: Path, competition: str, message: str) -> tuple[int, str]:
    """(submission reference, server message). The client reports a failed file upload through the
    reply's message instead of raising, so a reply without a reference is an error."""
    reply = api.competition_submit(str(path), message, competition, quiet=True)
    ref, text = int(getattr(reply, "ref", 0) or 0), str(getattr(reply, "message", "") or "")
    if text == getattr(api, "COMPETITION_SUBMIT_UPLOAD_FAILED_MESSAGE", None) or not ref:
        raise SubmitError(f"upload to {competition} failed: Kaggle replied {text!r} without a submission reference")
    return ref, text


def lookup_score(api: Any, competition: str, ref: int, wait_s: float,
                 sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Status and public score of submission ``ref``, polled for up to ``wait_s`` seconds while it
    is pending. Best effort: a failure here never fails a submission that was made."""
    deadline = time.monotonic() + wait_s
    found: dict[str, Any] = {}
    try:
        while True:
            for sub in api.competition_submissions(competition) or []:
                if sub is not None and int(sub.ref) == ref:
                    status = getattr(sub.status, "name", str(sub.status))
                    found = {"status": status, "public_score": float(sub.public_score) if sub.public_score else None}
            remaining = deadline - time.monotonic()
            if found.get("status") not in (None, "PENDING") or remaining <= 0:
                return found
            sleep(min(30.0, remaining))
    except Exception as err:  # noqa: BLE001 - the submission itself succeeded
        log.warning("could not read the submission's score: %s", describe(err))
        return found



# ---------------------------------------------------------------------------- code competitions


KERNEL_DONE, KERNEL_FAILED = "COMPLETE", ("ERROR", "CANCEL_REQUESTED", "CANCEL_ACKNOWLEDGED")


def account_name(api: Any) -> str | None:
    """The username the authenticated client knows (legacy credentials carry it), if any."""
    return (getattr(api, "config_values", None) or {}).get("username") or None


def dataset_exists(api: Any, ref: str) -> bool:
    import requests

    try:
        api.dataset_status(ref)
    except requests.HTTPError as err:
        if http_status(err) == 404:
            return False
        raise
    return True


def upload_dataset_once(api: Any, folder: Path, ref: str, notes: str) -> str:
    """Create the private dataset ``ref`` from ``folder`` (its ``dataset-metadata.json`` names it), or
    add a version when it exists: "created" or "versioned". The client reports a refusal in the reply."""
    if dataset_exists(api, ref):
        reply, done = api.dataset_create_version(str(folder), notes, quiet=True), "versioned"
    else:
        reply, done = api.dataset_create_new(str(folder), public=False, quiet=True), "created"
    status, error = str(getattr(reply, "status", "") or ""), getattr(reply, "error", None)
    if error or status.lower() != "ok":
        raise SubmitError(f"Kaggle did not take the dataset {ref}: {error or status or 'no status in its reply'}")
    return done


def push_kernel_once(api: Any, folder: Path) -> tuple[str, int]:
    """Push the notebook in ``folder`` (its ``kernel-metadata.json``), which Kaggle then runs: (its
    address, the new version's number)."""
    reply = api.kernels_push(str(folder))
    invalid = [source for name in ("invalid_dataset_sources", "invalid_competition_sources", "invalid_kernel_sources",
                                   "invalid_model_sources") for source in (getattr(reply, name, None) or [])]
    error = getattr(reply, "error", None)
    if error or invalid:
        raise SubmitError(f"Kaggle did not take the notebook in {folder}: {error or 'unknown sources ' + ', '.join(invalid)}")
    version = int(getattr(reply, "version_number", 0) or 0)
    if not version:
        raise SubmitError(f"Kaggle's reply to pushing {folder} names no notebook version")
    return str(getattr(reply, "url", "") or ""), version


def dataset_state(api: Any, ref: str) -> str | None:
    """"ready" once the dataset's new version can be attached to a notebook; None while Kaggle processes it."""
    status = str(api.dataset_status(ref) or "").lower()
    if status == "ready":
        return status
    if status in ("failed", "deleted"):
        raise SubmitError(f"Kaggle could not process the dataset {ref} (status {status})")
    return None


def kernel_state(api: Any, ref: str, version: int) -> str | None:
    """The run's final status (COMPLETE) of version ``version`` of notebook ``ref``, None while it is
    queued or running; a failed run raises."""
    reply = api.kernels_status(f"{ref}/{version}")
    status = getattr(reply.status, "name", str(reply.status))
    if status in KERNEL_FAILED:
        message = getattr(reply, "failure_message", "") or "no message"
        raise SubmitError(f"the notebook {ref} version {version} ended {status}: {message}; its log: "
                          f"kaggle kernels logs {ref}/{version}")
    return status if status == KERNEL_DONE else None


def wait_for(poll: Callable[[], str | None], what: str, wait_s: float, poll_s: float,
             sleep: Callable[[float], None] = time.sleep) -> str:
    """Call ``poll`` until it returns a final state, every ``poll_s`` for at most ``wait_s`` seconds."""
    deadline = time.monotonic() + wait_s
    while True:
        state = poll()
        if state is not None:
            return state
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise SubmitError(f"gave up waiting for {what} after {wait_s:g} s (submit.kernel_wait_s)")
        sleep(min(poll_s, remaining))


def submit_code_once(api: Any, competition: str, kernel: str, version: int, file_name: str, message: str) -> tuple[int, str]:
    """Submit the ``file_name`` that version ``version`` of notebook ``kernel`` wrote: (reference, message)."""
    reply = api.competition_submit_code(file_name, message, competition, kernel=kernel, kernel_version=version, quiet=True)
    ref, text = int(getattr(reply, "ref", 0) or 0), str(getattr(reply, "message", "") or "")
    if not ref:
        raise SubmitError(f"code submission of {kernel} version {version} to {competition} failed: Kaggle replied "
                          f"{text!r} without a submission reference")
    return ref, text


def code_submission(api: Any, upload: Path, dataset: str, kernel_folder: Path, kernel: str, competition: str,
                    file_name: str, message: str, max_retries: int, backoff_s: float, wait_s: float, poll_s: float,
                    score_wait_s: float, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """A code competition's submission: the models dataset up (created or a new version) and processed,
    the notebook pushed and run on Kaggle, its ``file_name`` submitted, the score looked up. Each
    request retried on its own by ``with_retries``, so a failed push never uploads the dataset again."""
    def retried(action: Callable[[], T], what: str) -> tuple[T, int]:
        return with_retries(action, max_retries, backoff_s, sleep, what)

    uploaded, dataset_attempts = retried(lambda: upload_dataset_once(api, upload, dataset, message), f"the dataset {dataset}")
    wait_for(lambda: retried(lambda: dataset_state(api, dataset), f"the status of {dataset}")[0],
             f"the dataset {dataset} to be ready", wait_s, poll_s, sleep)
    log.info("dataset %s %s", dataset, uploaded)
    (url, version), push_attempts = retried(lambda: push_kernel_once(api, kernel_folder), f"the notebook {kernel}")
    log.info("notebook %s version %d pushed; waiting for its run", kernel, version)
    status = wait_for(lambda: retried(lambda: kernel_state(api, kernel, version), f"the status of {kernel}")[0],
                      f"the notebook {kernel} version {version} to run", wait_s, poll_s, sleep)
    (ref, reply), submit_attempts = retried(
        lambda: submit_code_once(api, competition, kernel, version, file_name, message), f"the submission of {kernel}")
    log.info("submitted %s version %d to %s: reference %d (%s)", kernel, version, competition, ref, reply)
    return {"dataset": dataset, "dataset_upload": uploaded, "kernel": kernel, "kernel_version": version,
            "kernel_url": url, "kernel_status": status, "reference": ref, "server_message": reply,
            "attempts": {"dataset": dataset_attempts, "kernel": push_attempts, "submission": submit_attempts},
            **lookup_score(api, competition, ref, score_wait_s, sleep)}


# ---------------------------------------------------------------------------- credentials and download


def credentials_found() -> bool:
    """Whether any credential the official client reads exists (without importing it: ``import kaggle``
    authenticates at import and prints help when there is none)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    names = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
    return any((folder / name).is_file() for folder in config_folders() for name in names)


def config_folders() -> list[Path]:
    """Where the client looks for credential files, first to last."""
    home = Path.home()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    return [Path(d) for d in (os.environ.get("KAGGLE_CONFIG_DIR"),) if d] + [home / ".kaggle", xdg / "kaggle"]


def configured_username() -> str | None:
    """The username in the legacy credentials (``KAGGLE_USERNAME`` or ``kaggle.json``), read without
    importing the client; an access token names none."""
    import json

    if os.environ.get("KAGGLE_USERNAME"):
        return os.environ["KAGGLE_USERNAME"]
    for path in (folder / "kaggle.json" for folder in config_folders()):
        if path.is_file():
            try:
                return json.loads(path.read_text()).get("username") or None
            except (OSError, ValueError, AttributeError):
                return None
    return None


def credentials_help(competition: str) -> str:
    return (
        "no Kaggle credentials found: set KAGGLE_API_TOKEN (kaggle.com > Settings > API > Generate New Token) "
        "or save it as ~/.kaggle/access_token; the legacy KAGGLE_USERNAME + KAGGLE_KEY or ~/.kaggle/kaggle.json "
        "(chmod 600; KAGGLE_CONFIG_DIR moves the folder) work too; also accept the competition rules at "
        f"https://www.kaggle.com/competitions/{competition}/rules. "
        "Or download the zip yourself and use ingest.source=zip with ingest.path=<zip>."
    )


def download_competition(competition: str, dest: Path) -> Path:
    """Download the competition zip with the official client into ``dest`` (kept there as a cache:
    the client skips the download when the local copy is current, and resumes a partial one)."""
    if not credentials_found():
        raise StageError(credentials_help(competition))
    from kaggle.api.kaggle_api_extended import KaggleApi

    api = KaggleApi()
    try:
        api.authenticate()
    except SystemExit:  # the client exits instead of raising when it finds no usable credentials
        raise StageError(credentials_help(competition)) from None
    dest.mkdir(parents=True, exist_ok=True)
    try:
        api.competition_download_files(competition, path=str(dest), quiet=False)
    except Exception as err:  # the client raises HTTP and network errors of several kinds
        raise StageError(
            f"downloading Kaggle competition {competition!r} failed ({type(err).__name__}: {err}); "
            f"check the network and that you accepted the rules at "
            f"https://www.kaggle.com/competitions/{competition}/rules"
        ) from None
    archive = dest / f"{competition}.zip"
    if not archive.is_file():
        raise StageError(f"the Kaggle client reported success but wrote no {archive}")
    return archive

