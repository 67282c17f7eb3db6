"""sluicegate's OpenAI-compatible HTTP server: `create_app(engine)` in api.app, `sluice serve` in api.cli."""
