"""Scheduling simulation: traces, the simulator, invariant checks."""
