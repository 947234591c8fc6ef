"""Configs: `default.py` (every field, the presets as field dicts), `unet.py`, `transunet.py`."""
