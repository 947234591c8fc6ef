"""Training: the loop (`train`), runs trained together (`run_group`), the jitted steps
(`steps`), validation and the test pass (`evaluation`), metric writers (`metric_writer`)
and the config's name-valued choices checked before any work (`config_choices`)."""
