"""Spark sessions and Delta table operations."""
