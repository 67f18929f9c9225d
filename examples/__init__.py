"""Sequence mixers written the way a fork adds one (README "How to add an architecture")."""
