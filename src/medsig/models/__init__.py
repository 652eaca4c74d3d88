"""medsig.models."""
