"""Combining the models after training: ensemble selection, test-neighbour smoothing, calibration and the submission estimate."""
