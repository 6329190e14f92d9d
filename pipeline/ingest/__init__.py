"""Ingest's library: the sources (sources.py, one reader per ``ingest.source``), files into the build
folder (archive.py), the layout and CSV checks (checks.py, csv_encoding.py), the image decode check
(images.py), duplicate images (duplicates.py), and the verification that writes the normalised index
(verify.py). The ingest stage (pipeline/stages/ingest.py) composes them."""
