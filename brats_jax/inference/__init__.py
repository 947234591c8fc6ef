"""Inference: whole-volume slice prediction, ensembles, post-processing, uncertainty, work splitting."""
