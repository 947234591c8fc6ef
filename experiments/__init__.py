"""The study's sweeps (`sweeps`), running them (`run`) and their report (`report`)."""
