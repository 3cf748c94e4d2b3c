"""End-to-end tests share the integration tests' CPU images (built once per session)."""

from tests.integration.conftest import CpuImages, cpu_images, machine_profile  # noqa: F401
