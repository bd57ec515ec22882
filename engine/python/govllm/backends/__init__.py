"""Engine backends: each module exposes ``create(config: EngineConfig) -> Backend``."""
