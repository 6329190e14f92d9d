"""ingest: verify the competition files against the competition spec and put them into data/raw.

Sources (``ingest.source``, one reader each in ``pipeline.ingest.sources``): ``synthetic`` (the
State-Farm-shaped generator), ``shapes`` (the tiny CSV-layout generator), ``dir`` (a competition
folder), ``zip`` (the competition zip, flat or with nested zips such as State Farm's ``imgs.zip``) and
``kaggle`` (the official client downloads the zip). Every source is first materialised in a temp sibling
of data/raw and verified there; data/raw and data/hidden are swapped in only when everything checks out,
so a failure leaves the previous output untouched and nothing half-written.

What is verified follows ``cfg.competition`` (layout ``folder`` or ``csv``; see
``pipeline.config.CompetitionConfig``): the class names and their order come from the sample
submission's header; every image decodes; every train image is labelled exactly once with a known
class; ids, labels and groups carry no stray whitespace; every class has training images; the sample
submission lists exactly the test images; the CSVs are UTF-8 (``pipeline.ingest.checks``,
``pipeline.ingest.csv_encoding``, ``pipeline.ingest.images``). data/raw then holds the shipped files
plus the normalised view every later stage reads (``pipeline.competition``, written by
``pipeline.ingest.verify``): ``train_index.csv`` (id,path,label,group), ``test_index.csv`` (id,path),
``competition.json`` and ``quarantine.csv`` (id,path,reason); paths are relative to data/raw. A
quarantined image is removed and left out of the indexes, while the shipped CSVs still list it (so a
quarantined test image still needs a row in the submission). Duplicate images (test repeating train,
train repeating another group's) are counted in the figures and announced, never refused
(``pipeline.ingest.duplicates``).

A ``dir`` source is ingest's DVC dependency (``ingest.watch``), and DVC trusts a file's size and
modification time: an image edited in place keeping both (a tool that restores the mtime, a same-size
byte patch) is not seen, and `dvc repro` skips ingest. Run ``dvc repro -f ingest`` (or ``touch`` the
file) after such an edit (tests/test_dir_source_edits.py pins this down).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.config import Config
from pipeline.ingest.sources import create_reader
from pipeline.ingest.verify import Ingested, verify_and_index
from pipeline.io import atomic_dir, remove_leftovers
from pipeline.metrics import write_stage_metrics

log = logging.getLogger(__name__)


def run(cfg: Config) -> dict[str, Any]:
    """Materialise ``cfg.ingest.source`` into data/raw (+ data/hidden), verified; return the figures."""
    start = time.perf_counter()
    raw_dir, hidden_dir = cfg.paths.path("raw"), cfg.paths.path("hidden")
    for done in (raw_dir, hidden_dir):  # temp folders a killed run left (thousands of linked images)
        remove_leftovers(done.parent, done.name)
    with atomic_dir(raw_dir) as raw_build, atomic_dir(hidden_dir) as hidden_build, scratch_dir(raw_dir) as scratch:
        reader = create_reader(cfg)
        origin = reader.materialize(raw_build, hidden_build, scratch)
        ingested = verify_and_index(raw_build, origin, cfg.competition, cfg.ingest.on_corrupt, cfg.ingest.source)
        reader.finish_hidden(hidden_build)
    figures = summarize(ingested, cfg.ingest.source, time.perf_counter() - start)
    write_stage_metrics(cfg.paths.stage_metrics_file("ingest"), figures)
    log.info("ingest: %s", figures)
    return figures


def summarize(ingested: Ingested, source: str, seconds: float) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "source": source,
        "n_train": len(ingested.train),
        "n_test": len(ingested.test),
        "n_classes": ingested.competition.n_classes,
        "n_quarantined": len(ingested.quarantined),
        "n_exif_rotated": len(ingested.rotated),
        **ingested.duplicates.figures(),
    }
    if ingested.competition.has_groups:
        per_group = Counter(row.group for row in ingested.train)
        figures.update({"n_groups": len(per_group), "per_group_min": min(per_group.values(), default=0),
                        "per_group_max": max(per_group.values(), default=0)})
    return {**figures, "seconds": round(seconds, 3)}


@contextlib.contextmanager
def scratch_dir(raw_dir: Path) -> Iterator[Path]:
    """A temp folder beside data/raw (same filesystem, so unpacked files move in by rename)."""
    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{raw_dir.name}.", suffix=".scratch", dir=raw_dir.parent,
                                     ignore_cleanup_errors=True) as tmp:
        yield Path(tmp)
