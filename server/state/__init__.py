"""What the coordinator keeps: its configuration (with the differential-privacy and analytics
settings), the registry of connected workers and their tickets, and checkpoints.

Imports nothing else of :mod:`fedcore.server`.
"""
