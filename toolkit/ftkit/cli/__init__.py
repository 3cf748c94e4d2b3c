"""The `ftkit` command line. Commands parse flags, call one function, render the result.
Heavy modules are imported inside commands so `ftkit --help` stays fast."""
