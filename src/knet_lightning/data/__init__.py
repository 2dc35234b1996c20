"""Data sets, transforms and data modules."""
