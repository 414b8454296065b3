"""Data for training: synthetic benchmark sets and the per-step mix of sources."""
from __future__ import annotations
