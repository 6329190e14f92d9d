"""The Kaggle client, used by ``ingest`` (download) and ``submit`` (upload): one credential check,
download, upload with retries on transient failures, and the score lookup. ``import kaggle``
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
                 sleep: Callable[[float], None] = time.sleep) -> tuple[T, int]:
    """(result, attempts). Retries only transient failures (429, 5xx, dropped connections), at most
    ``max_retries`` times; a refused request (other 4xx) or a failed upload (``SubmitError``) is final."""
    for attempt in range(max_retries + 1):
        try:
            return action(), attempt + 1
        except SubmitError:
            raise
        except Exception as err:
            if not is_retryable(err):
                raise SubmitError(f"Kaggle refused the submission ({describe(err)}); not retried") from err
            if attempt == max_retries:
                raise SubmitError(f"upload gave up after {attempt + 1} attempts; last error {describe(err)}") from err
            delay = retry_delay(err, attempt, backoff_s)
            log.warning("submit attempt %d/%d failed (%s); retrying in %.1fs", attempt + 1, max_retries + 1, describe(err), delay)
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



# ---------------------------------------------------------------------------- credentials and download


def credentials_found() -> bool:
    """Whether any credential the official client reads exists (without importing it: ``import kaggle``
    authenticates at import and prints help when there is none)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    if os.environ.get("KAGGLE_API_TOKEN"):
        return True
    home = Path.home()
    xdg = Path(os.environ.get("XDG_CONFIG_HOME") or home / ".config")
    folders = [Path(d) for d in (os.environ.get("KAGGLE_CONFIG_DIR"),) if d] + [home / ".kaggle", xdg / "kaggle"]
    names = ("kaggle.json", "access_token", "access_token.txt", "credentials.json")
    return any((folder / name).is_file() for folder in folders for name in names)


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

