"""`fed-deq compose` and `fed-deq deploy-local`: the command-line side of real Flower deployments.

The work happens elsewhere (see docs/deploy.md): tools/compose.py writes compose files, tools/supervisor.py
runs a federation of real Flower processes on this machine, and both take their Flower command lines from
tools/flower_cmd.py. The supervisor (which imports torch through the run recorder) is imported only when
`deploy-local` runs, so the other commands start quickly.
"""

from __future__ import annotations

import argparse

from tools.args import add_scenario_args, checked_out_dir
from tools.compose import DEFAULT_IMAGE, supernode_count, write_compose


def cmd_compose(args: argparse.Namespace) -> int:
    """Write the compose file (and with --tls its TLS override) for a scenario's fleet."""
    written = write_compose(args.scenario, args.out, image=args.image, tls=args.tls, overrides=args.overrides,
                            run_name=args.run_name)
    print(f"{supernode_count(written[0])} SuperNodes; wrote {', '.join(str(p) for p in written)}")
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """Run a scenario on a loopback SuperLink/SuperNode deployment; a failed run raises RunFailed (exit 1)."""
    from tools.supervisor import run_local_deployment

    out_dir = checked_out_dir(args.out)
    summary = run_local_deployment(args.scenario, out_dir, overrides=args.overrides, tls=args.tls,
                                   node_auth=args.node_auth, kill_node_after_s=args.kill_node_after,
                                   timeout_s=args.timeout)
    info = summary["deployment"]
    print(f"finished {summary.get('rounds')} rounds in {info['wall_time_s']} s on {info['superlink']}; "
          f"final accuracy {summary.get('final_accuracy')}; outputs in {out_dir}")
    return 0


def register(subparsers) -> None:
    """Add the `compose` and `deploy-local` sub-commands to the fed-deq command line."""
    p = subparsers.add_parser(
        "compose", help="write a docker-compose file that runs a scenario's clients as containers",
        description="Write a docker-compose file that runs the scenario as containers: the server, and one "
                    "client container per device, each limited to its tier's share of the CPU.")
    add_scenario_args(p, optional=False)
    p.add_argument("--out", default="docker-compose.yml",
                   help="the compose file to write (default docker-compose.yml)")
    p.add_argument("--image", default=DEFAULT_IMAGE,
                   help=f"container image for every service (default {DEFAULT_IMAGE})")
    p.add_argument("--tls", action="store_true",
                   help="also write <name>.tls.yml beside it, which turns on encrypted connections")
    p.add_argument("--run-name", default=None, help="the run's outputs go to ./runs/NAME "
                                                    "(default: the scenario file's name)")
    p.set_defaults(func=cmd_compose)
    p = subparsers.add_parser(
        "deploy-local", help="run a scenario with real Flower server and client processes on this machine",
        description="Run the scenario with a real Flower server and one client process per device on this "
                    "machine (loopback only), and write the same files as simulate, plus deploy-logs/.")
    add_scenario_args(p, optional=False)
    p.add_argument("--out", required=True,
                   help="output folder (metrics.jsonl, summary.json, progress.json, deploy-logs/)")
    p.add_argument("--tls", action="store_true", help="encrypt connections with a throwaway certificate")
    p.add_argument("--node-auth", action="store_true",
                   help="let only registered clients join (needs --tls)")
    p.add_argument("--kill-node-after", type=float, default=None, metavar="SECONDS",
                   help="fault drill: kill the last client this many seconds after round 1 starts")
    p.add_argument("--timeout", type=float, default=1800.0, metavar="SECONDS",
                   help="give up if the run has not finished after this long (default 1800)")
    p.set_defaults(func=cmd_deploy_local)
