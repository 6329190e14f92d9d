"""Prefect flows: wiring only. Every stage runs through DVC (dvc.yaml) so an orchestrated run is
cached, versioned and equal to `dvc repro`."""
