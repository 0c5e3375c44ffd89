"""rasterkube: Earth-observation mosaics, inference, change scores and vectorization on Ray."""
