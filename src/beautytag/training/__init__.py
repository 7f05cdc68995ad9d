"""Training, evaluation, metrics and calibration."""
