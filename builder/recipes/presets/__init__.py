"""Recipe stage: the presets shipped with the package (one YAML file per preset)."""
