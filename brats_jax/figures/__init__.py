"""Figures: learning curves and test slices (`plots`), pictures to review (`overlays`)."""
