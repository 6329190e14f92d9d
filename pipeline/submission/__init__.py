"""The submission: the file and its way to Kaggle.

- ``build.py``: the file, built from test predictions in the sample submission's format and validated
  against ``sample_submission.csv`` (the submit stage and the code-competition notebook).
- ``upload.py``: the upload (a file, or a code competition's dataset and notebook), its message and
  commands, the dry run's reason, the score lookup (the submit stage).
"""
