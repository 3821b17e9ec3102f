"""Model serving on Ray Serve: the HTTP endpoint and its deployment."""
