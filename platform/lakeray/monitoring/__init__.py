"""Drift monitoring and retraining decisions — not built yet."""
