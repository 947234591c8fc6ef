"""Figures: learning curves, test slices and the overlays to review."""
