"""Tests added from the mutation run survivors (see TESTING.md)."""
