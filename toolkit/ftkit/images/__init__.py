"""Pinned images: variants (data), strict template rendering, hash locks, content tags,
and the builder behind `ftkit build`, `ftkit lock` and `ftkit images`."""
