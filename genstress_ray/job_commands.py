"""``genstress submit``, ``genstress jobs`` and ``genstress stop``: campaigns as Ray jobs on a cluster."""

from __future__ import annotations

import datetime

ADDRESS_HELP = "the cluster's dashboard address, e.g. http://head:8265 (default: $RAY_ADDRESS)"


def _address(args) -> str:
    import os

    from genstress_ray.jobs import JobError

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise JobError("no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS")
    return address


def _submit(args) -> int:
    from genstress_ray import jobs

    cfg, job = jobs.plan(args.config, args.working_dir, args.output, args.run_id, tuple(args.credentials_env or ()))
    address = _address(args)
    client = jobs.connect(address)
    job_id = jobs.submit(client, cfg, job, tuple(args.pip or ()), resume=args.resume)
    print(f"submitted {job_id}: {job.entrypoint}\n  run: {job.run_uri}")
    if not (args.wait or args.follow):
        print(f"  its log: ray job logs --address {address} --follow {job_id}")
        return 0
    status = jobs.follow(client, job_id, logs=args.follow)
    print(f"{job_id}: {status}")
    if status != "SUCCEEDED" and not args.follow:
        print(client.get_job_logs(job_id)[-3000:])
    return jobs.FINAL[status]


def _jobs(args) -> int:
    from genstress_ray import jobs

    rows = jobs.genstress_jobs(jobs.connect(_address(args)))
    if not rows:
        print("no genstress jobs on this cluster")
    for r in rows:
        started = datetime.datetime.fromtimestamp(r["start_time"] / 1000).strftime("%Y-%m-%d %H:%M") \
            if r["start_time"] else "-"
        print(f"{r['submission_id']:<40} {r['status']:<10} {started}  {r['run_uri']}")
    return 0


def _stop(args) -> int:
    from genstress_ray import jobs

    status = jobs.stop(jobs.connect(_address(args)), args.submission_id)
    print(f"{args.submission_id}: {status}")
    return 0 if status in jobs.FINAL else 1


def add_jobs(sub) -> None:
    submit = sub.add_parser("submit", help="submit a campaign to a Ray cluster as a job (genstress run there)")
    submit.add_argument("config", help="the campaign's YAML config, inside --working-dir")
    submit.add_argument("--address", help=ADDRESS_HELP)
    submit.add_argument("--run-id", help="the run's id (default: the config's, else the time); a run is submitted "
                                         "once: a second submission of it is refused")
    submit.add_argument("--output", help="overrides the config's output: an object-storage URI or an absolute path "
                                         "on the cluster")
    submit.add_argument("--working-dir", default=".", help="the folder shipped to the cluster (default: .)")
    submit.add_argument("--pip", action="append", metavar="REQUIREMENT",
                        help="a pip requirement installed for the job (e.g. genstress_ray==0.1); repeatable. "
                             "Without it the cluster's installed package runs the job")
    submit.add_argument("--credentials-env", action="append", metavar="NAME",
                        help="an environment variable the cluster already sets for object storage (e.g. "
                             "AWS_ACCESS_KEY_ID); only the name travels; repeatable")
    submit.add_argument("--resume", action="store_true",
                        help="resubmit a run whose job failed or was stopped; it resumes from its finished shards")
    submit.add_argument("--wait", action="store_true", help="wait for the job and exit with its final status")
    submit.add_argument("--follow", action="store_true", help="as --wait, streaming the job's logs")
    submit.set_defaults(func=_submit)
    listing = sub.add_parser("jobs", help="the campaigns submitted to a cluster, with their status and run URIs")
    listing.add_argument("--address", help=ADDRESS_HELP)
    listing.set_defaults(func=_jobs)
    stop = sub.add_parser("stop", help="stop a submitted campaign (genstress submit --resume with the same run id "
                                       "resumes it)")
    stop.add_argument("submission_id", help="as genstress jobs lists it")
    stop.add_argument("--address", help=ADDRESS_HELP)
    stop.set_defaults(func=_stop)
