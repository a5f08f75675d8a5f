"""The scan config: which registry to watch, which campaigns to run on its newest version, and when
a scan should alert. Validated before any work, like the campaign config.

    scan: digits-nightly
    registry: s3://models/digits-cnn        # <registry>/<version>/<checkpoint> (models.versions)
    output: s3://genstress-runs/nightly      # scans and their campaign runs
    campaigns: [digits_defuse.yaml]          # paths relative to this file, or inline configs
    alert: {regressed: true, new_region_faults: 50, accuracy_drop: 0.2}
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, ValidationError, model_validator

from genstress_ray.config import (CampaignConfig, ConfigError, Location, Name, _Strict, format_validation_error,
                                  load_config, read_yaml)


class AlertConfig(_Strict):
    """When a scan exits non-zero (3) so that a scheduler alerts: a region that was fixed fails again
    (``regressed``); a new failure region holds at least ``new_region_faults`` faults (None: never);
    a tracked region's accuracy fell by more than ``accuracy_drop`` since the previous scan (None: never)."""

    regressed: bool = True
    new_region_faults: Annotated[int, Field(gt=0)] | None = None
    accuracy_drop: Annotated[float, Field(gt=0, le=1)] | None = 0.2


class ScanConfig(_Strict):
    """A nightly scan. ``campaigns``: campaign configs (YAML paths, relative to the scan file, or inline
    mappings), each with its own strategy and budget; each needs an ``oracle`` (it labels the regions).
    ``fixed_accuracy``: a tracked region counts as fixed when no failure region of the scan matches it
    and the version classifies at least this share of its generated test draws and of its real
    subgroup members correctly (``scan.tracking``). ``match_containment``: the containment (the mean
    share of each region's faults inside the other's membership radius) from which two regions of
    one label are the same region."""

    scan: Name
    registry: Location
    output: Location = Field(default="genstress-scans", validate_default=True)
    storage_options: dict[str, Any] = {}
    campaigns: Annotated[list[str | dict[str, Any]], Field(min_length=1)]
    fixed_accuracy: Annotated[float, Field(gt=0, le=1)] = 0.9
    match_containment: Annotated[float, Field(gt=0, le=1)] = 0.5
    # Real test images inside each failure region are scored too, when the generator has an encoder.
    member_quantile: Annotated[float, Field(gt=0, lt=1)] = 0.9
    alert: AlertConfig = AlertConfig()

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "match_overlap" in data:
            raise ValueError("match_overlap: the Bhattacharyya overlap of two regions' Gaussians no longer matches "
                             "regions (it never matched the same flaw twice); use match_containment (default 0.5), "
                             "README 'Nightly scans'")
        return data


def load_scan_config(path: str | Path | dict, output: str | None = None,
                     registry: str | None = None) -> tuple[ScanConfig, dict[str, CampaignConfig]]:
    """The scan config and its campaigns (by campaign name), validated; ``output`` and ``registry``
    override the scan's.

    Raises:
        ConfigError: naming the file and field, before anything runs.
    """
    base = Path(".")
    if isinstance(path, dict):
        raw = dict(path)
    else:
        base = Path(path).parent
        try:
            raw = read_yaml(Path(path).read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read scan config {str(path)!r}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"scan config {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"scan config {str(path)!r} must hold a mapping of fields")
    raw.update({k: v for k, v in (("output", output), ("registry", registry)) if v})
    try:
        cfg = ScanConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("campaign config", "scan config")) from None
    campaigns: dict[str, CampaignConfig] = {}
    for i, entry in enumerate(cfg.campaigns):
        where = f"campaigns[{i}]" + (f" ({entry})" if isinstance(entry, str) else "")
        try:
            campaign = load_config(base / entry if isinstance(entry, str) else entry)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if campaign.classifier.task == "segmentation":
            raise ConfigError(f"{where}: campaign {campaign.campaign!r} tests a segmentation model "
                              "(classifier.task); a scan labels and tracks classifiers' failure regions only")
        if campaign.oracle is None:
            raise ConfigError(f"{where}: campaign {campaign.campaign!r} has no 'oracle': a scan labels its regions "
                              "with the campaign's oracle classifier")
        if campaign.campaign in campaigns:
            raise ConfigError(f"{where}: campaign name {campaign.campaign!r} appears twice; each campaign of a scan "
                              "needs its own name (its regions are tracked under it)")
        campaigns[campaign.campaign] = campaign
    return cfg, campaigns
