"""ChangeScore service: per-pixel temporal change scores."""
