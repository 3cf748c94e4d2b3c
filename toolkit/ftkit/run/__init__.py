"""Run directories, the step journal, executors and the runner behind `ftkit up`."""
