"""Code competitions: the chain's fold models, ensemble, smoothing and calibration shipped to Kaggle as
a dataset, and a notebook that reruns them on the hidden test images without internet.

- ``script.py``: the notebook itself (self-contained until it has put the shipped package on sys.path).
- ``predict.py``: what the notebook calls: the chain's test-time computation, free of training-only
  imports (Lightning, Prefect, DVC are not on Kaggle's image).
- ``export.py``: the upload and notebook folders written from the chain's outputs by the submit stage.
"""
