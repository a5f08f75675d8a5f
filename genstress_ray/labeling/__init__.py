"""Labelling, one label per region: oracle, file import, Label Studio round trip, review page."""

from genstress_ray.labeling.files import read_label_file
from genstress_ray.labeling.label_studio import export_tasks, import_export, labeling_config
from genstress_ray.labeling.methods import CONFIG_ORACLE, LABELLERS, Labeller
from genstress_ray.labeling.oracle import label_run, oracle_fault_labels, oracle_labels, reviewed_samples
from genstress_ray.labeling.support import flagged_regions, support_flags
from genstress_ray.labeling.table import (LABELS_SCHEMA, NOT_A_FAILURE, LabelError, labels_table, read_labels,
                                          region_ids, validate_labels, write_labels)

__all__ = ["flagged_regions", "support_flags", "CONFIG_ORACLE", "LABELLERS", "LABELS_SCHEMA", "Labeller", "NOT_A_FAILURE", "LabelError", "export_tasks", "import_export", "labeling_config",
           "label_run", "labels_table", "oracle_fault_labels", "oracle_labels", "read_label_file",
           "read_labels", "region_ids", "reviewed_samples", "validate_labels", "write_labels"]
