"""Data logic: pseudo-masks, preprocessing, splits (everything between raw files and model-ready arrays)."""
