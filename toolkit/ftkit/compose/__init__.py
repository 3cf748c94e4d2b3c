"""Compose stacks: a plan rendered as `compose.yaml`, `.env` and a README.

`render.render(plan, options)` is pure (Plan in, Stack out); `write.write_stack` puts a
Stack on disk. The stack runs the same containers `ftkit up` would start - each service
comes from `plan.container.container_spec` - so a person can `cd` into it and use plain
`docker compose` without ftkit.
"""

from __future__ import annotations

from ftkit.compose.stack import RenderOptions, Stack, render

__all__ = ["RenderOptions", "Stack", "render"]
