"""One narrow module per outside system. Each one is the only place that talks to that
system and the only place that translates its failures into `ftkit.errors`."""
