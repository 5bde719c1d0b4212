"""recops benchmarks: each script writes JSON to bench/results/ and prints a short table."""
