"""Support for tests, the demo and benchmarks: tiny models in the real layouts, full-size random checkpoints, the built-in demo cases. Not imported by the runtime packages."""
