"""The ways a run's regions get labels, as plugins: one ``Labeller`` each, registered in ``LABELLERS``.

Each makes a ``labels`` table from a run (and the value given to its ``genstress label`` option);
``genstress label`` builds its options from this registry. The review page (a person clicking in a
browser) and the Label Studio export are interactive and stay commands of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from genstress_ray.context import RunContext
from genstress_ray.labeling.files import read_label_file
from genstress_ray.labeling.label_studio import import_export
from genstress_ray.labeling.oracle import label_run
from genstress_ray.labeling.table import LabelError
from genstress_ray.models import ModelRef
from genstress_ray.registry import Registry
from genstress_ray.storage import RunStore

# ``genstress label RUN --oracle`` with no checkpoint: the run config's own oracle.
CONFIG_ORACLE = "<config>"


@dataclass(frozen=True)
class Labeller:
    """A labelling method: ``label(store, value, options) -> table`` (a ``labels`` table here; a
    ``relabels`` table for the repair's ``DECIDERS``).

    ``value`` is what its option was given (a file, a checkpoint; ``default`` when given bare);
    ``options`` holds ``rho``, ``per_region``, ``fault_labels`` and the campaign's ``config``.
    """

    name: str
    help: str
    metavar: str
    label: Callable[[RunStore, str, dict[str, Any]], pa.Table]
    default: str | None = None

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def _oracle(store: RunStore, value: str, options: dict[str, Any]) -> pa.Table:
    ctx = RunContext.open(store.uri, options.get("config"), store.storage_options)
    reference = ctx.oracle() if value == CONFIG_ORACLE else ctx.classifier(ModelRef(value))
    return label_run(store, reference, **{k: options[k] for k in ("rho", "per_region", "fault_labels") if k in options})


LABELLERS: Registry[Labeller] = Registry("labelling method", LabelError)
for _labeller in (
    Labeller("oracle", "a reference classifier labels the region samples (no CHECKPOINT: the config's oracle)",
             "CHECKPOINT", _oracle, default=CONFIG_ORACLE),
    Labeller("file", "import region labels from a CSV/JSON file (region_id,label[,is_failure])", "FILE",
             lambda store, value, options: read_label_file(value)),
    Labeller("import_label_studio", "import Label Studio's JSON export", "EXPORT_JSON",
             lambda store, value, options: import_export(value, store.uri)),
):
    LABELLERS.register(_labeller.name, _labeller)
