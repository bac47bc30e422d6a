"""The data layer: crash-safe writes and the curated preference store. Imports no model code."""
