"""Benchmarks: what they run (`workload`), step timing and FLOP counting (`timing`), the train
step (`train`), whole-volume prediction (`evaluation`), the input pipeline (`data_pipeline`)
and FLOPs per slice (`flops`); the command is `python -m brats_jax.bench`."""
