"""Data files shipped with the environments (word lists); no code."""
