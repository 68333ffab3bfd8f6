"""Model ports used by the examples, tests and benchmarks (imported as ``examples.models.<name>``)."""
