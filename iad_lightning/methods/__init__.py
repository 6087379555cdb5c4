"""LightningModules, one per method, on the shared AnomalyModule base."""
