"""Serving: the engine in a background thread (engine_loop), the OpenAI-compatible HTTP API (app,
protocol, metrics), `dsv3 serve` (cli) and the load generator `dsv3 bench serve` (bench)."""
