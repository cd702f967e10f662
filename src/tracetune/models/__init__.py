"""Model loading: see tracetune.models.registry."""
