"""Prediction service: patch-based model inference (windowing numerics in ``windows``)."""
