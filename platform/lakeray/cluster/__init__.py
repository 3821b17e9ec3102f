"""Ray clusters: connecting, starting a local one, job submission."""
