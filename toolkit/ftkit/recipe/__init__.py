"""Recipes and machine profiles: loading (YAML with positions), models, validation, schema."""
