"""Embedded synthetic competitions, rendered locally so the pipeline runs (and is tested) without
Kaggle: ``drivers.py`` a State-Farm-shaped driver dataset in State Farm's folder layout (``ingest.source:
synthetic``), ``shapes.py`` a tiny dataset in Kaggle's CSV layout (``ingest.source: shapes``). Neither
is an adapter: a competition's adapter is its spec in configs/ (State Farm's: configs/statefarm.yaml)."""
