"""What the tests and the benchmarks share: real gloo ranks in local processes, and time limits
that hold on a loaded machine. Not used by the pipeline itself."""
