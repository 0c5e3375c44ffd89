"""Mosaic service: cloud-masked per-window composites (median or best pixel) of STAC imagery."""
