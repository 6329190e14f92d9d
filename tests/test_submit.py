"""submit stage: a malformed submission is refused before any upload, with file and row; uploads go
through the official kaggle client against a local stub of Kaggle's API (tests/kaggle_stub.py)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from kaggle_stub import STUB_KEY, STUB_USERNAME, KaggleStub, use_stub

from pipeline.competition import Competition, read_competition, write_competition
from pipeline.config import Config, load_profile, write_params
from pipeline.errors import BadInputError, StageError
from pipeline.io import file_sha256
from pipeline.kaggle_client import SubmitError, retry_delay, with_retries
from pipeline.kernel.export import code_folder
from pipeline.metrics import write_predictions
from pipeline.stages.submit import run
from pipeline.submission.build import build_submission, validate_submission
from pipeline.submission.upload import code_revision, submit_command
from pipeline.synthetic.drivers import CLASSES

IDS = [f"img_{i}.jpg" for i in range(1, 7)]
HEADER = "img," + ",".join(CLASSES)  # State Farm's sample submission
ROOT = Path(__file__).resolve().parent.parent
# Every stubbed upload names a competition that cannot exist on Kaggle.
COMPETITION = "pipeline-test-no-such-competition"


def make_cfg(root: Path, **submit):
    overrides = {f"submit.{key}": value for key, value in {"backoff_s": 0.001, **submit}.items()}
    return load_profile("smoke", {"ingest.competition": COMPETITION, **overrides}).at(root)


def write_sample(root: Path, ids: list[str] = IDS, header: str = HEADER) -> Path:
    path = root / "data/raw/sample_submission.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    k = header.count(",")
    path.write_text(header + "\n" + "".join(f"{img}," + ",".join([f"{1 / k:.6g}"] * k) + "\n" for img in ids))
    return path


def write_calibrated(root: Path, ids: list[str] = IDS, probs: np.ndarray | None = None,
                     classes: tuple[str, ...] = CLASSES) -> Path:
    if probs is None:  # unnormalised on purpose
        probs = np.random.default_rng(0).dirichlet(np.ones(len(classes)), size=len(ids)) * 2
    return write_predictions(root / "data/predictions/calibrate/test.csv", ids, probs, classes)


def write_raw_competition(root: Path, source: str = "dir", classes: tuple[str, ...] = CLASSES,
                          id_column: str = "img") -> None:
    """competition.json as ingest writes it; source ``dir`` (real files), so uploads are allowed."""
    write_competition(root / "data/raw", Competition(classes, id_column, True, "subject", "folder", source))


@pytest.fixture
def project(tmp_path):
    write_sample(tmp_path)
    write_raw_competition(tmp_path)
    write_calibrated(tmp_path)
    return tmp_path


@pytest.fixture
def stub(monkeypatch, tmp_path):
    with KaggleStub() as server:
        use_stub(monkeypatch, server, tmp_path / "home")
        yield server


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    home = tmp_path / "empty-home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(home / ".kaggle"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------------------- validation

GOOD_ROW = ["0.1"] * 10


def lines(rows: dict[str, list[str]] | None = None, header: str = HEADER) -> list[str]:
    rows = rows or {img: list(GOOD_ROW) for img in IDS}
    return [header] + [",".join([img, *values]) for img, values in rows.items()]


def with_value(column: int, text: str, fix: int = 9) -> list[str]:
    """Good lines except row 3 (img_2) has ``text`` in ``column``; ``fix`` keeps the row sum at 1."""
    out = lines()
    values = list(GOOD_ROW)
    values[column] = text
    try:
        values[fix] = repr(round(0.2 - float(text), 10)) if column != fix else values[fix]
    except ValueError:
        pass
    out[2] = ",".join(["img_2.jpg", *values])
    return out


def reorder(text_lines: list[str]) -> list[str]:
    swapped = []
    for line in text_lines:
        cells = line.split(",")
        cells[1], cells[2] = cells[2], cells[1]
        swapped.append(",".join(cells))
    return swapped


# case -> (file lines, expected row or None, text the message must contain)
MALFORMED = {
    "missing id": (lines()[:3] + lines()[4:], None, "missing, first img_3.jpg (row 4 of"),
    "extra id": (lines() + ["img_99.jpg," + ",".join(GOOD_ROW)], 8, "img_99.jpg"),
    "duplicate id": (lines() + [lines()[2]], 8, "duplicate id img_2.jpg (first at row 3)"),
    "wrong column name": (lines(header=HEADER.replace("c9", "x9")), 1, "missing column(s) c9; unexpected column(s) x9"),
    "missing column": ([",".join(line.split(",")[:-1]) for line in lines()], 1, "missing column(s) c9"),
    "extra column": ([line + (",c10" if i == 0 else ",0") for i, line in enumerate(lines())], 1, "unexpected column(s) c10"),
    "reordered columns": (reorder(lines()), 1, "out of order"),
    "duplicated column": (lines(header=HEADER.replace("c9", "c8")), 1, "duplicated column(s) c8"),
    "NaN": (with_value(3, "NaN"), 3, "c3 is NaN"),
    "inf": (with_value(3, "inf"), 3, "c3 is inf"),
    "negative": (with_value(3, "-0.1"), 3, "c3 = -0.1 is not in (0, 1]"),
    "zero": (with_value(3, "0"), 3, "c3 = 0 is not in (0, 1]"),
    "above one": (with_value(0, "1.5"), 3, "c0 = 1.5 is not in (0, 1]"),
    "not a number": (with_value(4, "abc"), 3, "c4 = 'abc' is not a number"),
    "empty value": (with_value(4, ""), 3, "c4 = '' is not a number"),
    "row sum not 1": (lines({img: ["0.11"] * 10 for img in IDS}), 2, "sum to 1.1"),
    "row sum off by 1e-5": (with_value(0, "0.10001", fix=0), 3, "not 1 (tolerance 1e-06)"),
    "short row": (lines()[:4] + ["img_4.jpg,0.5,0.5"] + lines()[5:], 5, "has 3 fields"),
    "empty file": ([], 1, "empty file"),
    "wrong header": (["id,label"] + lines()[1:], 1, "header must be exactly img,c0"),
    "header only": (lines()[:1], None, "6 test id(s) missing"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_submission_is_refused_with_file_and_row(tmp_path, case):
    text_lines, row, expected = MALFORMED[case]
    sample = write_sample(tmp_path)
    path = tmp_path / "bad.csv"
    path.write_text("\n".join(text_lines) + ("\n" if text_lines else ""))
    with pytest.raises(BadInputError) as info:
        validate_submission(path, sample)
    message = str(info.value)
    assert str(path) in message and expected in message, message
    assert info.value.row == row
    assert "row" in message  # the missing-id cases point at sample_submission's row instead


def test_good_submission_passes_and_counts_rows(tmp_path):
    sample = write_sample(tmp_path)
    path = tmp_path / "good.csv"
    path.write_text("\n".join(lines()) + "\n")
    assert validate_submission(path, sample) == len(IDS)


@pytest.mark.parametrize("damage", ["missing id", "NaN", "zero", "negative", "wrong column"])
def test_bad_predictions_upload_nothing_and_keep_the_previous_submission(project, stub, damage):
    cfg = make_cfg(project, enabled=True)
    run(cfg)
    submission = cfg.paths.path("submission")
    good = submission.read_bytes()
    n_requests = len(stub.requests)

    pred = project / "data/predictions/calibrate/test.csv"
    df = pd.read_csv(pred)
    if damage == "missing id":
        df = df.drop(index=2)
    elif damage == "NaN":
        df.loc[2, "c3"] = np.nan
    elif damage == "zero":
        df.loc[2, "c3"] = 0.0
    elif damage == "negative":
        df.loc[2, "c3"] = -0.1
    else:
        df = df.rename(columns={"c9": "c10"})
    df.to_csv(pred, index=False)

    with pytest.raises(BadInputError) as info:
        run(cfg)
    assert str(submission) in str(info.value) or str(pred) in str(info.value)
    if damage in ("NaN", "zero", "negative"):
        assert info.value.row == 4 and str(pred) in str(info.value) and "c3" in str(info.value)  # row 4 of both files
    assert len(stub.requests) == n_requests, "nothing may be sent after a refused file"
    assert submission.read_bytes() == good
    assert sorted(p.name for p in submission.parent.iterdir()) == ["submission.csv"], "no temp files left"


# ---------------------------------------------------------------------------- any competition's format

SHAPES = ("circle", "square", "triangle")
SHAPES_HEADER = "image_id," + ",".join(SHAPES)


@pytest.fixture
def shapes_project(tmp_path):
    """A 3-class competition whose sample submission is ``image_id,circle,square,triangle``."""
    write_sample(tmp_path, header=SHAPES_HEADER)
    write_raw_competition(tmp_path, classes=SHAPES, id_column="image_id")
    write_calibrated(tmp_path, classes=SHAPES)
    return tmp_path


def test_submission_header_is_the_sample_submissions_for_any_competition(shapes_project):
    """The submission takes the sample submission's header (its id column and class columns), not State Farm's."""
    cfg = make_cfg(shapes_project, enabled=False)
    assert run(cfg)["n_rows"] == len(IDS)
    text = cfg.paths.path("submission").read_text().splitlines()
    assert text[0] == SHAPES_HEADER
    assert [line.split(",")[0] for line in text[1:]] == IDS
    assert np.allclose(pd.read_csv(cfg.paths.path("submission"))[list(SHAPES)].sum(axis=1), 1.0, atol=1e-7)


def test_predictions_in_another_column_order_are_refused(shapes_project):
    """Class columns are matched by name and order: a reordered predictions file is refused, never relabelled."""
    pred = shapes_project / "data/predictions/calibrate/test.csv"
    pd.read_csv(pred)[["id", "square", "circle", "triangle"]].to_csv(pred, index=False)
    with pytest.raises(BadInputError, match="header must be exactly id,circle,square,triangle: columns out of order") as info:
        build_submission(pred, shapes_project / "data/raw/sample_submission.csv", shapes_project / "out.csv")
    assert info.value.file == pred and info.value.row == 1
    assert not (shapes_project / "out.csv").exists()


def damaged_shapes(root: Path, row: int, values: dict[str, str]) -> Path:
    """The shapes predictions with the cells of data row ``row`` (0-based) replaced by ``values`` (as text)."""
    pred = root / "data/predictions/calibrate/test.csv"
    df = pd.read_csv(pred, dtype=str, keep_default_na=False)
    for column, text in values.items():
        df.loc[row, column] = text
    df.to_csv(pred, index=False)
    return pred


# case -> (data row, replaced cells, file row and column the message must name)
NEGATIVE = {
    "all negative": (3, {"circle": "-0.2", "square": "-0.3", "triangle": "-0.5"}, 5, "circle = -0.2 is negative"),
    "third column negative": (1, {"triangle": "-0.25"}, 3, "triangle = -0.25 is negative"),
    "second column negative": (0, {"square": "-1e-09"}, 2, "square = -1e-09 is negative"),
}


@pytest.mark.parametrize("case", list(NEGATIVE))
def test_negative_predictions_are_refused_naming_file_row_and_column(shapes_project, case):
    """Renormalising an all-negative row would make it look valid: any negative value is refused,
    naming the predictions file, its row and the class column that holds it."""
    row, values, file_row, expected = NEGATIVE[case]
    pred = damaged_shapes(shapes_project, row, values)
    out = shapes_project / "out.csv"
    with pytest.raises(BadInputError) as info:
        build_submission(pred, shapes_project / "data/raw/sample_submission.csv", out)
    assert info.value.file == pred and info.value.row == file_row
    assert expected in str(info.value), str(info.value)
    assert not out.exists()


@pytest.mark.parametrize("text", ["NaN", "nan", "inf", "1e400"])
def test_non_finite_prediction_is_reported_in_its_own_column(shapes_project, text):
    """A NaN or inf in the third class column is reported at that column, not at the first column its
    renormalised row would spoil."""
    pred = damaged_shapes(shapes_project, 1, {"triangle": text})
    with pytest.raises(BadInputError) as info:
        build_submission(pred, shapes_project / "data/raw/sample_submission.csv", shapes_project / "out.csv")
    message = str(info.value)
    assert info.value.file == pred and info.value.row == 3
    assert f"triangle is {text}, not a finite number" in message and "circle" not in message, message


def test_all_zero_prediction_row_is_refused_as_such(shapes_project):
    """A row of zeros cannot be renormalised: it is refused as such, not as a NaN in its first column."""
    pred = damaged_shapes(shapes_project, 4, dict.fromkeys(SHAPES, "0"))
    with pytest.raises(BadInputError, match=r"row 6: img_5.jpg: every probability is 0") as info:
        build_submission(pred, shapes_project / "data/raw/sample_submission.csv", shapes_project / "out.csv")
    assert info.value.file == pred


# ---------------------------------------------------------------------------- synthetic data stays local


@pytest.mark.parametrize("source", ["synthetic", "shapes"])
def test_upload_of_synthetic_predictions_is_refused_before_any_request(project, stub, source):
    """Predictions from generated data never reach Kaggle: with credentials and submit.enabled, the
    stage refuses before the client sends anything."""
    write_raw_competition(project, source=source)
    with pytest.raises(SubmitError, match=f"refusing to upload: .*synthetic data \\(ingest.source={source}"):
        run(make_cfg(project, enabled=True))
    assert stub.requests == [], "no request may reach Kaggle"
    assert not (project / "reports/submission.json").exists()


def test_synthetic_predictions_still_make_a_dry_run(project, stub, capsys):
    """submit.enabled=false keeps the synthetic pipelines' submit stage working (a local file, no upload)."""
    write_raw_competition(project, source="synthetic")
    assert run(make_cfg(project, enabled=False))["dry_run"] is True
    assert "submit.enabled is false" in capsys.readouterr().out
    assert stub.requests == []


def test_submit_needs_the_competition_from_ingest(project, stub):
    """Without competition.json the source of the data is unknown: nothing is built or sent."""
    (project / "data/raw/competition.json").unlink()
    with pytest.raises(StageError, match="competition.json not found: run the ingest stage first"):
        run(make_cfg(project, enabled=True))
    assert stub.requests == []


# ---------------------------------------------------------------------------- dry run


def test_dry_run_prints_the_exact_command_and_records_it(project, capsys):
    cfg = make_cfg(project, enabled=False, message="fold-avg v2")
    figures = run(cfg)
    out = capsys.readouterr().out
    path = cfg.paths.path("submission")
    message = f"fold-avg v2 | code {code_revision()} | data {file_sha256(path)[:12]}"
    command = f'kaggle competitions submit -c {COMPETITION} -f {path} -m "{message}"'
    assert command in out.splitlines()
    assert figures == {"kind": "file", "n_rows": len(IDS), "dry_run": True, "reference": None}
    record = json.loads((project / "reports/submission.json").read_text())
    assert record["command"] == command and record["dry_run"] and record["reference"] is None
    assert record["kind"] == "file" and record["commands"] == [command]
    assert list(code_folder(cfg).iterdir()) == [], "a file competition has no dataset or notebook"
    assert json.loads(cfg.paths.stage_metrics_file("submit").read_text()) == figures
    validate_submission(path, project / "data/raw/sample_submission.csv")
    # Unnormalised predictions (rows summing to 2) are renormalised on write.
    assert np.allclose(pd.read_csv(path)[list(CLASSES)].sum(axis=1), 1.0, atol=1e-7)


def test_enabled_without_credentials_is_a_dry_run(project, no_credentials, capsys):
    figures = run(make_cfg(project, enabled=True))
    assert figures["dry_run"] is True
    assert "no Kaggle credentials" in capsys.readouterr().out


def test_command_quotes_a_message_for_the_shell():
    cmd = submit_command("comp", Path("/x/sub.csv"), 'say "hi" $HOME `x` \\')
    assert cmd == 'kaggle competitions submit -c comp -f /x/sub.csv -m "say \\"hi\\" \\$HOME \\`x\\` \\\\"'
    assert subprocess.run(["bash", "-c", f"printf %s {cmd.split(' -m ', 1)[1]}"], capture_output=True,
                          text=True, env={"HOME": "/nowhere"}).stdout == 'say "hi" $HOME `x` \\'


# ---------------------------------------------------------------------------- upload via the stub


def test_stub_submission_uploads_the_file_and_records_the_reference(project, stub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    cfg = make_cfg(project, enabled=True, message="calibrated ensemble")
    figures = run(cfg)
    path = cfg.paths.path("submission")

    assert figures["dry_run"] is False and figures["reference"] == 40_001 and figures["public_score"] == 0.534
    [start] = stub.calls("StartSubmissionUpload")
    assert start.json() | {"lastModifiedEpochSeconds": 0} == {
        "competitionName": COMPETITION, "fileName": "submission.csv",
        "contentLength": path.stat().st_size, "lastModifiedEpochSeconds": 0}
    [put] = stub.calls("upload")
    assert put.body == path.read_bytes()
    assert "Authorization" not in put.headers, "credentials must not go to the storage URL"
    [create] = stub.calls("CreateSubmission")
    description = create.json()["submissionDescription"]
    assert description == f"calibrated ensemble | code {code_revision()} | data {file_sha256(path)[:12]}"
    assert code_revision() != "unknown"

    record = json.loads((project / "reports/submission.json").read_text())
    assert record["reference"] == 40_001 and record["status"] == "COMPLETE" and record["public_score"] == 0.534
    assert record["sha256"] == file_sha256(path) and record["attempts"] == 1

    captured = capsys.readouterr()
    artifacts = [p.read_text() for p in project.rglob("*") if p.is_file() and p.suffix in (".json", ".csv")]
    for text in [captured.out, captured.err, caplog.text, *artifacts]:
        assert STUB_KEY not in text


def test_failed_file_upload_reported_as_a_message_raises(project, stub):
    stub.fail("upload", 500, times=None)
    with pytest.raises(SubmitError, match="Could not submit to competition"):
        run(make_cfg(project, enabled=True))
    assert stub.calls("CreateSubmission") == []
    assert not (project / "reports/submission.json").exists()


def test_reply_without_a_reference_raises(project, stub):
    stub.create_reply = {"message": "Submission rejected: scoring error"}
    with pytest.raises(SubmitError, match="scoring error"):
        run(make_cfg(project, enabled=True))


def test_server_errors_are_retried_until_success(project, stub, caplog):
    stub.fail("StartSubmissionUpload", 503, times=2)
    stub.fail("CreateSubmission", 429, times=1, retry_after="0")
    figures = run(make_cfg(project, enabled=True, max_retries=3))
    assert figures["reference"] == 40_001
    assert len(stub.calls("StartSubmissionUpload")) == 4  # 503, 503, ok (then 429 on create), ok
    assert len(stub.submissions) == 1
    assert json.loads((project / "reports/submission.json").read_text())["attempts"] == 4
    assert "HTTP 503" in caplog.text and "HTTP 429" in caplog.text


def test_persistent_server_error_gives_up_after_max_retries(project, stub):
    stub.fail("StartSubmissionUpload", 500, times=None)
    with pytest.raises(SubmitError, match="gave up after 3 attempts; last error HTTP 500"):
        run(make_cfg(project, enabled=True, max_retries=2))
    assert len(stub.calls("StartSubmissionUpload")) == 3


@pytest.mark.parametrize("status", [400, 403, 404])
def test_client_errors_are_not_retried(project, stub, status):
    stub.fail("StartSubmissionUpload", status, times=None)
    with pytest.raises(SubmitError, match=f"HTTP {status}.*not retried"):
        run(make_cfg(project, enabled=True, max_retries=3))
    assert len(stub.calls("StartSubmissionUpload")) == 1


def test_wrong_credentials_are_refused_without_retry_or_leak(project, stub, monkeypatch, capsys):
    monkeypatch.setenv("KAGGLE_KEY", "wrong-secret-key-zzzz")
    with pytest.raises(SubmitError, match="HTTP 401") as info:
        run(make_cfg(project, enabled=True))
    assert len(stub.requests) == 1
    captured = capsys.readouterr()
    assert "wrong-secret-key-zzzz" not in str(info.value) + captured.out + captured.err


def test_backoff_doubles_and_honours_retry_after():
    import requests

    def http_error(status: int, headers: dict | None = None) -> requests.HTTPError:
        response = requests.Response()
        response.status_code, response.headers = status, requests.structures.CaseInsensitiveDict(headers or {})
        return requests.HTTPError(f"status {status}", response=response)

    failures = iter([http_error(502), http_error(503), http_error(500)])

    def flaky():
        error = next(failures, None)
        if error:
            raise error
        return "done"

    delays: list[float] = []
    assert with_retries(flaky, max_retries=5, backoff_s=1.5, sleep=delays.append) == ("done", 4)
    assert delays == [1.5, 3.0, 6.0]
    assert retry_delay(http_error(429, {"Retry-After": "7"}), 0, 1.0) == 7.0
    assert retry_delay(http_error(429), 2, 1.0) == 4.0


def test_fresh_process_reaches_the_stub_through_the_environment(project, tmp_path):
    """The stub recipe (docs/design.md#tool-facts): KAGGLE_API_ENVIRONMENT=LOCALHOST before kaggle is imported, endpoint replaced."""
    write_params(make_cfg(project, enabled=True), project / "params.yaml")
    home = tmp_path / "subprocess-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KAGGLE_")}
    env.update(HOME=str(home), KAGGLE_CONFIG_DIR=str(home / ".kaggle"), KAGGLE_API_ENVIRONMENT="LOCALHOST",
               KAGGLE_USERNAME="stub-user", KAGGLE_KEY=STUB_KEY, NO_PROXY="127.0.0.1,localhost",
               PYTHONPATH=str(ROOT))
    script = (
        "import sys, kagglesdk.kaggle_env as e\n"
        "e._env_to_endpoint[e.KaggleEnv.LOCAL] = sys.argv[1]\n"
        "from pipeline.config import load_params\n"
        "from pipeline.stages.submit import run\n"
        "print(run(load_params(sys.argv[2])))\n"
    )
    with KaggleStub() as server:
        proc = subprocess.run([sys.executable, "-c", script, server.url, str(project / "params.yaml")],
                              capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert [s["bytes"] for s in server.submissions] == [(project / "submissions/submission.csv").read_bytes()]
    assert "'reference': 40001" in proc.stdout
    assert STUB_KEY not in proc.stdout + proc.stderr


# ---------------------------------------------------------------------------- code competitions


def code_cfg(root: Path, **submit) -> Config:
    """The smoke profile as a code competition, polling without delay."""
    overrides = {f"submit.{key}": value for key, value in {"backoff_s": 0.001, "poll_s": 0.001, **submit}.items()}
    return load_profile("smoke", {"ingest.competition": COMPETITION, "competition.submission": "code",
                                  **overrides}).at(root)


@pytest.fixture
def chain(smoke_run, tmp_path):
    """A copy of the session's smoke run (every stage's outputs), its data taken for real files
    (competition.json's source ``dir``) so that uploads are allowed."""
    from conftest import copy_of

    root = copy_of(smoke_run, tmp_path / "repo").root
    competition = read_competition(root / "data/raw")
    write_raw_competition(root, classes=competition.classes, id_column=competition.id_column)
    return root


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "dataset-metadata.json"}


@pytest.mark.slow
def test_code_competition_dry_run_prints_the_four_commands_and_writes_both_folders(chain, stub, capsys):
    cfg = code_cfg(chain, enabled=False, owner="alice")
    run(cfg)
    out = capsys.readouterr().out.splitlines()
    record = json.loads((chain / "reports/submission.json").read_text())
    upload, kernel = code_folder(cfg) / "upload", code_folder(cfg) / "kernel"
    message = record["message"]
    expected = [
        f'kaggle datasets version -p {upload} -m "{message}"  # the first time: kaggle datasets create -p {upload}',
        f"kaggle kernels push -p {kernel}",
        f"kaggle kernels status alice/{COMPETITION}-inference",
        f'kaggle competitions submit -c {COMPETITION} -k alice/{COMPETITION}-inference -v VERSION -f submission.csv '
        f'-m "{message}"',
    ]
    assert out[out.index("dry run (submit.enabled is false); to upload:") + 1:][:4] == expected
    assert record["kind"] == "code" and record["commands"] == expected and record["dry_run"]
    assert record["dataset"] == f"alice/{COMPETITION}-models" and record["kernel"] == f"alice/{COMPETITION}-inference"
    assert {"pipeline-kernel.json", "pipeline.zip", "dataset-metadata.json", "backbone.pt"} <= {p.name for p in upload.iterdir()}
    assert sorted(p.name for p in kernel.iterdir()) == ["inference.py", "kernel-metadata.json"]
    assert stub.requests == []
    validate_submission(chain / "submissions/submission.csv", chain / "data/raw/sample_submission.csv")


@pytest.mark.slow
def test_code_competition_end_to_end_through_the_stub(chain, stub, capsys, caplog):
    """Dataset created (then versioned), notebook pushed and run, its submission.csv submitted, the score
    read back; the owner comes from the credentials; no secret in any output."""
    caplog.set_level(logging.DEBUG)
    stub.dataset_states = ["BLOBS_RECEIVED", "READY"]
    cfg = code_cfg(chain, enabled=True, message="notebook v1")
    figures = run(cfg)
    upload, kernel = code_folder(cfg) / "upload", code_folder(cfg) / "kernel"
    dataset, notebook = f"{STUB_USERNAME}/{COMPETITION}-models", f"{STUB_USERNAME}/{COMPETITION}-inference"

    assert figures["dry_run"] is False and figures["reference"] == 40_001 and figures["public_score"] == 0.534
    assert stub.datasets[dataset] == [files_of(upload)]
    [pushed] = stub.kernels[notebook]
    assert pushed["text"] == (kernel / "inference.py").read_text()
    assert pushed["enableInternet"] is False and pushed["isPrivate"] is True and pushed["enableGpu"] is True
    assert pushed["datasetDataSources"] == [dataset] and pushed["competitionDataSources"] == [COMPETITION]
    [submitted] = stub.calls("CreateCodeSubmission")
    assert submitted.json() | {"submissionDescription": None} == {
        "competitionName": COMPETITION, "kernelOwner": STUB_USERNAME, "kernelSlug": f"{COMPETITION}-inference",
        "kernelVersion": 1, "fileName": "submission.csv", "submissionDescription": None}
    assert submitted.json()["submissionDescription"].startswith("notebook v1 | code ")
    assert len(stub.calls("GetKernelSessionStatus")) == 2  # RUNNING, then COMPLETE
    record = json.loads((chain / "reports/submission.json").read_text())
    assert record["kind"] == "code" and record["dataset_upload"] == "created" and record["kernel_version"] == 1
    assert record["status"] == "COMPLETE" and record["kernel_status"] == "COMPLETE"
    assert record["commands"][0] == f"kaggle datasets create -p {upload}"
    assert record["command"].startswith(f"kaggle competitions submit -c {COMPETITION} -k {notebook} -v 1 -f submission.csv")

    stub.kernel_states = ["QUEUED", "RUNNING", "COMPLETE"]
    assert run(code_cfg(chain, enabled=True, message="notebook v2"))["reference"] == 40_002
    record = json.loads((chain / "reports/submission.json").read_text())
    assert record["dataset_upload"] == "versioned" and record["kernel_version"] == 2 and len(stub.datasets[dataset]) == 2
    assert stub.calls("CreateCodeSubmission")[-1].json()["kernelVersion"] == 2

    captured = capsys.readouterr()
    artifacts = [p.read_bytes() for folder in ("data", "reports", "submissions") for p in (chain / folder).rglob("*")
                 if p.is_file() and p.suffix in (".json", ".csv", ".py")]
    for text in [captured.out.encode(), captured.err.encode(), caplog.text.encode(), *artifacts]:
        assert STUB_KEY.encode() not in text


@pytest.mark.slow
def test_code_competition_retries_each_request_on_its_own(chain, stub, caplog):
    """A failed push or status query is retried by the retry helper without uploading the dataset again."""
    stub.fail("SaveKernel", 503, times=2)
    stub.fail("GetKernelSessionStatus", 429, times=1, retry_after="0")
    stub.fail("CreateCodeSubmission", 500, times=1)
    figures = run(code_cfg(chain, enabled=True, max_retries=3))
    assert figures["reference"] == 40_001
    assert len(stub.calls("CreateDataset")) == 1 and len(stub.calls("SaveKernel")) == 3
    assert len(stub.calls("CreateCodeSubmission")) == 2
    record = json.loads((chain / "reports/submission.json").read_text())
    assert record["attempts"] == {"dataset": 1, "kernel": 3, "submission": 2}
    assert f"the notebook {STUB_USERNAME}/{COMPETITION}-inference: attempt 1/4 failed (HTTP 503" in caplog.text


@pytest.mark.slow
def test_a_failed_notebook_run_is_reported_and_nothing_submitted(chain, stub):
    stub.kernel_states = ["RUNNING", "ERROR"]
    stub.kernel_failure = "CUDA out of memory"
    record = (chain / "reports/submission.json").read_bytes()  # the smoke run's dry run
    with pytest.raises(SubmitError, match="version 1 ended ERROR: CUDA out of memory; its log: kaggle kernels logs"):
        run(code_cfg(chain, enabled=True))
    assert stub.calls("CreateCodeSubmission") == []
    assert (chain / "reports/submission.json").read_bytes() == record


@pytest.mark.slow
def test_a_notebook_that_never_finishes_is_given_up_on(chain, stub):
    stub.kernel_states = ["RUNNING"]
    with pytest.raises(SubmitError, match="gave up waiting for the notebook .* after 0.05 s"):
        run(code_cfg(chain, enabled=True, kernel_wait_s=0.05, poll_s=0.01))
    assert stub.calls("CreateCodeSubmission") == []


@pytest.mark.slow
def test_code_competition_on_synthetic_data_is_refused_before_anything_is_uploaded(chain, stub):
    write_raw_competition(chain, source="synthetic")
    cfg = code_cfg(chain, enabled=True)
    with pytest.raises(SubmitError, match="refusing to upload: .*synthetic data"):
        run(cfg)
    assert stub.requests == [] and not (code_folder(cfg) / "upload").exists()
