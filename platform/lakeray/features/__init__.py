"""Feature jobs: declarations, discovery, the runner, and the example data generator."""

from lakeray.features.spec import FeatureJob, feature_job
from lakeray.lakehouse.quality import Expectation, expect

__all__ = ["FeatureJob", "feature_job", "Expectation", "expect"]
