"""The command-line front ends: sample, chat and demo, and what they share (common.py; timing.py:
compile notices and timings)."""
