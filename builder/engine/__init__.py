"""Engine-build stage: ``build_engine()`` -> EngineArtifact (plan + manifest) under ``engines/<name>/``."""
