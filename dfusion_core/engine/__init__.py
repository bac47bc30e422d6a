"""The engine: loading, model families, sampling, attention control, masks, fusion, cache, tokens, scoring,
pair building. Imports no app, trainer or world code (tests/test_structure.py)."""
