"""The regions stage at scale: DP-GMM fit time at 5k, 50k and 500k faults, 10-D and 256-D latents.

    python benchmarks/regions_scale.py [--sizes 5000 50000 500000] [--caps 10000 20000 50000]

What the fit costs depends on the number of faults it is fitted on, their dimension and the number of
components (``reduce.max_components``, 100), not on the images, so the faults here are synthetic: 25
Gaussian clusters in 10 dimensions (a beta-VAE's latents), and the same embedded in 256 dimensions with
noise (a style generator's styles; ``fit_regions`` reduces them to 32 principal components). Each fit
is ``regions.fit_regions`` as the stage calls it, on 2 threads: first at every size with the default
cap (``reduce.max_faults``: the faults fitted on are a seeded subsample of at most this many; all are
then assigned), then at each of ``--cap-sizes`` with each cap in ``--caps``, to find the largest cap that keeps a fit
under 60 s. Writes benchmarks/results/regions_scale.json (``--merge``: adds its runs to the file's,
replacing those of the same size, dimension and cap).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "regions_scale.json"
LIMIT_S = 60.0


def faults(n: int, dims: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` synthetic fault latents (25 clusters), with source and predicted labels."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 3, (25, 10))
    z = means[rng.integers(0, 25, n)] + rng.normal(0, 0.5, (n, 10))
    if dims > 10:
        basis, _ = np.linalg.qr(rng.normal(size=(dims, 10)))
        z = z @ basis.T + rng.normal(0, 0.1, (n, dims))
    return z, rng.integers(0, 10, n), rng.integers(0, 10, n)


def timed_fit(n: int, dims: int, cap: int) -> dict:
    from genstress_ray.regions import fit_regions

    z, source, pred = faults(n, dims)
    started = time.perf_counter()
    fit = fit_regions(z, source, pred, max_points=cap)
    seconds = time.perf_counter() - started
    row = {"faults": n, "dims": dims, "cap": cap, "fitted_on": fit.n_fitted, "seconds": round(seconds, 1),
           "regions": fit.table.num_rows, "converged": fit.converged}
    print(row, flush=True)
    return row


def main() -> int:
    from threadpoolctl import threadpool_limits

    from genstress_ray.config import ReduceConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[5_000, 50_000, 500_000])
    parser.add_argument("--caps", type=int, nargs="+", default=[10_000, 20_000])
    parser.add_argument("--cap-sizes", type=int, nargs="+", default=[50_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[10, 256])
    parser.add_argument("--merge", action="store_true", help="add these runs to the results file's")
    args = parser.parse_args()
    default_cap = ReduceConfig().max_faults
    with threadpool_limits(2):
        runs = [timed_fit(n, d, default_cap) for d in args.dims for n in args.sizes]
        runs += [timed_fit(n, d, cap) for d in args.dims for n in args.cap_sizes for cap in args.caps
                 if cap < min(default_cap, n)]
    if args.merge:
        mine = {(r["faults"], r["dims"], r["cap"]) for r in runs}
        runs = [r for r in json.loads(RESULTS.read_text())["runs"] if (r["faults"], r["dims"], r["cap"]) not in mine] + runs
    dims = sorted({r["dims"] for r in runs})
    # The largest cap under the limit at every size measured with it (the assignment of all faults grows with N).
    under = {d: max((c for c in {r["cap"] for r in runs if r["dims"] == d}
                     if all(r["seconds"] < LIMIT_S for r in runs if r["dims"] == d and r["cap"] == c
                            and r["faults"] >= c)), default=None) for d in dims}
    result = {"benchmark": "regions_scale", "command": "python benchmarks/regions_scale.py (see --merge)", "threads": 2,
              "default_cap": default_cap, "max_components": ReduceConfig().max_components, "runs": runs,
              "largest_cap_under_60s": under,
              "machine": {"platform": platform.platform(), "python": platform.python_version()}}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
