"""Measure before deciding: `doctor` (is this machine fit to run, and does it match another
host), `report` (what a run did, as HTML and Markdown with plots) and `bench` (the scaling
test and its decision note). Reads run directories and the gateways; runs nothing itself
except through the runner."""
