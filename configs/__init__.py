"""Python config presets: each file exposes `get_config(arg: str | None) -> ml_collections.ConfigDict`."""
