"""Nightly scans: the newest version of a model registry, its failure regions tracked across versions."""

from genstress_ray.scan.config import AlertConfig, ScanConfig, load_scan_config
from genstress_ray.scan.run import ScanError, ScanResult, main_scan, run_scan, scan_date

__all__ = ["AlertConfig", "ScanConfig", "ScanError", "ScanResult", "load_scan_config", "main_scan", "run_scan",
           "scan_date"]
