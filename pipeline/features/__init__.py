"""The conv-feature cache: the frozen conv base's features of every image (and of the train images'
augmented copies), computed once by the ``features`` stage and read by the dense heads' stages.

- ``cache.py``: the format (folders, index, checksummed fp16 chunks, ``meta.json``) and its reader.
- ``embed.py``: the conv base's batched fp16 forward pass (shared with the code-competition notebook).
- ``extract.py``: the writer: rows and copies, fingerprints, chunks computed, verified and resumed.
"""
