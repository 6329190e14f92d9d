"""The conv-feature cache: the frozen conv base's features of every image (and of the train images'
augmented copies), computed once by the ``features`` stage and read by the dense heads' stages.

- ``cache.py``: the format (folders, index, checksummed fp16 chunks, ``meta.json``) and its reader.
- ``embed.py``: the forward passes shared with the code-competition notebook (conv base fp16 features,
  a network's softmax).
- ``extract.py``: the writer: rows and copies, fingerprints, chunks computed, verified and resumed.
"""
