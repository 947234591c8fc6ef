"""The study's sweeps (`sweeps`), running them (`run`) and their report (`report`); the
one-off analyses of EXPERIMENTS.md are in `experiments.analyses`."""
