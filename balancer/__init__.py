"""Slicefleet scheduling core: pure Python, no Ray, torch or Redis."""
