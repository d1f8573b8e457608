"""Demos: local runs of the real process roles that show what cotrain does."""
