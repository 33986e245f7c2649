"""Reduced precision: FP16/INT8/INT4 bundles, calibration, accuracy-targeted INT8, accuracy reports."""
