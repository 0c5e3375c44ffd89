"""Vectorization service: thresholded rasters → polygons with statistics → GeoParquet."""
