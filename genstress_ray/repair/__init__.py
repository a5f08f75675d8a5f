"""Data repair: relabelling proposals for the training images inside failure regions, the decisions
on them (oracle, file, Label Studio, review page), and applying accepted relabels to D."""

from genstress_ray.repair.decisions import (DECIDERS, add_relabels, apply_relabels, read_relabels, relabels_table,
                                            update_relabels, validate_relabels, write_relabels)
from genstress_ray.repair.proposals import (KEEP, RepairError, label_studio_tasks, proposal_table, propose,
                                            ranked, read_proposals, write_proposals)

__all__ = ["DECIDERS", "KEEP", "RepairError", "add_relabels", "apply_relabels", "label_studio_tasks", "proposal_table", "propose", "ranked", "read_proposals",
           "read_relabels", "relabels_table", "update_relabels", "validate_relabels", "write_proposals",
           "write_relabels"]
