"""recops.ops: registry, telemetry, online metrics, drift, retraining policy, closed loop, CLI."""
