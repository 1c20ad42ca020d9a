"""Freeze-Omni assistant: engine, sessions, dialogue state machine and command line."""
