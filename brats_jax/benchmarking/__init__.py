"""Benchmarks of the train step, evaluation, the input pipeline and FLOP counts (commands: `python -m brats_jax.bench`)."""
