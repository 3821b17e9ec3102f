"""Feature jobs: declarations, discovery, the runner, and the example data generator."""

from lakeray.features.spec import FeatureJob, feature_job

__all__ = ["FeatureJob", "feature_job"]
