"""One reader per ingest source (``ingest.source``), chosen by ``create_reader``:

- ``dir``: a competition folder, hardlinked (or copied) entry by entry;
- ``zip``: the competition zip, flat or with nested zips such as State Farm's ``imgs.zip``;
- ``kaggle``: the same zip, downloaded by the official client;
- ``synthetic`` and ``shapes``: the embedded generators (pipeline.synthetic), rendered locally.

A reader puts the competition's Kaggle-layout entries into a build folder (``materialize``, which
returns how errors should name the source) and completes data/hidden (``finish_hidden``): synthetic
sources wrote the hidden test labels, real ones have none.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from pipeline.config import CompetitionConfig, Config
from pipeline.errors import BadInputError, StageError
from pipeline.ingest.archive import find_layout_root, link_layout, move_layout, unpack_competition_zip
from pipeline.kaggle_client import download_competition

HIDDEN_README = (
    "No hidden labels: this data was ingested from the real competition files, whose test labels\n"
    "are known only to Kaggle. Synthetic ingests put test_labels.csv (id,label[,group]) here.\n"
)
SYNTHETIC_SOURCES = ("synthetic", "shapes")


class Reader:
    """A source of the competition files: ``entries`` are the top-level entries its layout names."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.entries = layout_entries(cfg.competition)

    def materialize(self, build: Path, hidden_build: Path, scratch: Path) -> Path:
        """Put the source's Kaggle-layout entries into ``build``; return how errors should name the source."""
        raise NotImplementedError

    def finish_hidden(self, hidden_build: Path) -> None:
        (hidden_build / "README.txt").write_text(HIDDEN_README)


class DirReader(Reader):
    def materialize(self, build: Path, hidden_build: Path, scratch: Path) -> Path:
        folder = resolve_input(self.cfg, "folder")
        link_layout(folder, build, self.entries)
        return folder


class ZipReader(Reader):
    def archive(self) -> Path:
        return resolve_input(self.cfg, "zip file")

    def materialize(self, build: Path, hidden_build: Path, scratch: Path) -> Path:
        archive = self.archive()
        unpack_competition_zip(archive, scratch, self.entries)
        move_layout(find_layout_root(scratch, self.entries), build, self.entries)
        return archive


class KaggleReader(ZipReader):
    def archive(self) -> Path:
        return download_competition(self.cfg.ingest.competition, self.cfg.paths.path("staging"))


class EmbeddedReader(Reader):
    def materialize(self, build: Path, hidden_build: Path, scratch: Path) -> Path:
        source = self.cfg.ingest.source
        generated = scratch / source
        generate_synthetic(self.cfg, generated, hidden_build)
        move_layout(generated, build, self.entries)
        return Path(source)

    def finish_hidden(self, hidden_build: Path) -> None:
        require_hidden_labels(hidden_build)


READERS: dict[str, type[Reader]] = {"dir": DirReader, "zip": ZipReader, "kaggle": KaggleReader,
                                    **dict.fromkeys(SYNTHETIC_SOURCES, EmbeddedReader)}


def create_reader(cfg: Config) -> Reader:
    """The reader of ``cfg.ingest.source``."""
    reader = READERS.get(cfg.ingest.source)
    if reader is None:  # the config schema allows no other value
        raise StageError(f"unknown ingest.source {cfg.ingest.source!r}")
    return reader(cfg)


def layout_entries(spec: CompetitionConfig) -> tuple[str, ...]:
    """The top-level entries of the competition folder the spec names (State Farm: imgs,
    driver_imgs_list.csv, sample_submission.csv)."""
    paths = [spec.train_dir, spec.test_dir, spec.sample_submission, *([spec.labels_csv] if spec.labels_csv else [])]
    return tuple(dict.fromkeys(PurePosixPath(p).parts[0] for p in paths))


def resolve_input(cfg: Config, kind: str) -> Path:
    """``ingest.path``, relative paths taken from the project root."""
    if not cfg.ingest.path:
        raise StageError(f"ingest.source={cfg.ingest.source} needs ingest.path (the {kind})")
    path = Path(cfg.ingest.path).expanduser()
    if not path.is_absolute():
        path = cfg.paths.root / path
    want_dir = cfg.ingest.source == "dir"
    if not (path.is_dir() if want_dir else path.is_file()):
        raise BadInputError(path, f"no such {kind} (ingest.path)")
    return path


def generate_synthetic(cfg: Config, out_dir: Path, hidden_dir: Path) -> None:
    """The embedded generators (imported only for their source): State Farm's layout or the CSV one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.ingest.source == "synthetic":
        from pipeline.synthetic.drivers import generate

        generate(cfg.ingest.synthetic, out_dir, hidden_dir)
    else:
        from pipeline.synthetic.shapes import generate as generate_shapes

        s = cfg.ingest.shapes
        generate_shapes(out_dir, hidden_dir, n_classes=s.n_classes, n_train=s.n_train, n_test=s.n_test,
                        width=s.width, height=s.height, jpeg_quality=s.jpeg_quality, seed=s.seed)


def require_hidden_labels(hidden_dir: Path) -> None:
    if not (hidden_dir / "test_labels.csv").is_file():
        raise StageError("the synthetic generator wrote no hidden test_labels.csv")
