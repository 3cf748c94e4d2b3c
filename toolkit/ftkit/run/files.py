"""Moved to `ftkit.files` (atomic writes live below every layer that uses them); this alias
keeps old imports working until every caller has moved."""

from ftkit.files import read_json, write_atomic, write_json

__all__ = ["read_json", "write_atomic", "write_json"]
