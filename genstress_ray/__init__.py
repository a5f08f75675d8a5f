"""genstress_ray: stress-test image classifiers with generative models, as batch jobs on Ray.

Example:
    >>> import genstress_ray
    >>> result = genstress_ray.run_campaign("jobs/mnist_defuse.yaml", output="/tmp/runs")  # doctest: +SKIP
    >>> result.run_uri, result.counts["faults"]  # doctest: +SKIP
"""

from importlib import metadata

from genstress_ray.config import CampaignConfig, ConfigError, load_config

try:
    __version__ = metadata.version("genstress-ray")
except metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"


def run_campaign(config, output=None, run_id=None, stop_after=None, progress=None):
    """Run or resume a campaign; see ``genstress_ray.pipeline.run_campaign``."""
    from genstress_ray.pipeline import run_campaign as _run  # Ray is imported only when a campaign runs

    return _run(config, output=output, run_id=run_id, stop_after=stop_after, progress=progress)


__all__ = ["CampaignConfig", "ConfigError", "__version__", "load_config", "run_campaign"]
