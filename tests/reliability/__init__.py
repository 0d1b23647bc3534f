"""Reliability tests (issue 13): fuzzing and fault campaigns, bounded for CI."""
