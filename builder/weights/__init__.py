"""Weight stage: ``quantize_weights(model, plan, statistics) -> WeightSet`` (integer weights and scales)."""
