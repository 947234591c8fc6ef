"""Training: the loop, grouped runs, jitted steps, validation and the test pass, metric writers, config choices."""
