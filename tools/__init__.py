"""Developer tools: synthetic models for tests and demos, and the benchmark (`make bench`)."""
