"""GPUs through NVML: inventory, power limits, driver facts. Real where a driver exists;
a simulated backend (named as such) stands in only where no GPU can exist (tests, CI)."""
