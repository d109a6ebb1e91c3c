"""``fedrank deploy {certs,up,run,down,status,server,register,node-key,node}``: registered by :func:`add_commands`.

Handlers parse arguments, call :mod:`deploy.cluster` / :mod:`deploy.certs` / :mod:`deploy.supervise` and print
for people; they return an exit code: 0 ok; 2 input the command cannot use (a ``ValueError``: bad port, state
folder, TLS files, run-config key), one line naming it; 1 a process that would not start or a run that failed,
with the tail of its log. The commands of a deployment across hosts (``server``, ``register``, ``node-key``,
``node``) are in :mod:`deploy.cli_remote`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deploy.cli_remote import add_remote_commands
from deploy.errors import report as _error

DEFAULT_STATE = "runs/deploy"


def add_commands(subparsers: Any) -> None:
    """Register ``deploy`` (with its own sub-commands) on an ``argparse`` ``add_subparsers()`` object."""
    d = subparsers.add_parser(
        "deploy", help="run the federation on real Flower processes (TLS, SuperNode auth), here or across hosts",
        description="A SuperLink and N SuperNodes on loopback with TLS, SuperNode authentication and persistent "
                    "SuperLink state (`up`); then `flwr run . NAME --stream --run-config STATE/run-config.toml` "
                    "or `deploy run`. Across hosts: `server` on the SuperLink's host, `node-key` and `node` on "
                    "each device.")
    d.set_defaults(func=lambda a: (d.print_help(), 2)[1])
    sub = d.add_subparsers(dest="deploy_command", metavar="{certs,up,run,down,status,server,register,node-key,node}")

    c = sub.add_parser("certs", help="create a private CA and a server certificate for loopback",
                       description="Write ca.crt, ca.key, server.pem, server.key (existing files are kept).")
    c.add_argument("--dir", default=f"{DEFAULT_STATE}/certs", help=f"output folder (default {DEFAULT_STATE}/certs)")
    c.add_argument("--host", action="append", help="a host name or IP address for the server certificate "
                                                   "(repeatable; default 127.0.0.1, ::1, localhost)")
    c.add_argument("--days", type=int, default=365)
    c.add_argument("--overwrite", action="store_true", help="replace existing files")
    c.set_defaults(func=cmd_certs)

    u = sub.add_parser("up", help="start the SuperLink and one SuperNode per client shard",
                       description="Prepare the data and shards of the run config, TLS files and node keys; start "
                                   "flower-superlink and flower-supernode processes; write $FLWR_HOME/config.toml.")
    _state_opt(u)
    u.add_argument("--name", default="fedrank", help="SuperLink connection name in $FLWR_HOME/config.toml")
    u.add_argument("--scenario", help="run-config overrides from simulations/scenarios/NAME.toml (or a .toml path)")
    u.add_argument("--nodes", type=int, help="number of SuperNodes = partition.num-clients (default: the config's)")
    u.add_argument("--rounds", type=int, help="server.num-rounds")
    u.add_argument("--out", help="server.out-dir of the run (made absolute)")
    u.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config value (repeatable)")
    u.add_argument("--port", type=int, default=9093, help="SuperLink port, all APIs over TLS (0: a free port)")
    u.add_argument("--node-port", type=int, help="first SuperNode runtime port, one per node (default: --port + 1; "
                                                 "0: free ports)")
    u.add_argument("--flwr-home", help="where the Flower CLI config goes (default $FLWR_HOME, else STATE/flwr-home)")
    u.add_argument("--certs", help="use the TLS files in this folder (fedrank deploy certs) instead of STATE/certs")
    u.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for every process to come up")
    u.set_defaults(func=cmd_up)

    r = sub.add_parser("run", help="submit the run and see it through SuperLink and SuperNode faults",
                       description="Submit STATE/run-config.toml with `flwr run`, then supervise: restart a dead "
                                   "SuperLink (same port and database) and resubmit its run, which resumes after "
                                   "the last checkpointed round; restart a dead SuperNode once the SuperLink reports "
                                   "it offline; resubmit a run that failed. Writes deploy-run.json beside "
                                   "results.json.")
    _state_opt(r)
    r.add_argument("--max-resubmits", type=int, default=5, help="give up after this many resubmissions")
    r.add_argument("--status-every", type=float, default=10.0, help="seconds between run-status checks")
    r.add_argument("--limit", type=float, help="give up after this many seconds")
    r.add_argument("--json", action="store_true", help="print the run report as JSON")
    r.add_argument("--node-wait", type=float, default=300.0,
                   help="`deploy server` deployments: seconds to wait for the registered SuperNodes to come online "
                        "before submitting (then the run starts with those online)")
    r.set_defaults(func=cmd_run)

    dn = sub.add_parser("down", help="stop every process `deploy up`, `server` or `node` started (safe to call twice)")
    _state_opt(dn)
    dn.add_argument("--grace", type=float, default=10.0, help="seconds between SIGTERM and SIGKILL")
    dn.set_defaults(func=cmd_down)

    s = sub.add_parser("status", help="the deployment's processes and whether they run")
    _state_opt(s)
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)


    add_remote_commands(sub)


def _state_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state", default=DEFAULT_STATE, help=f"deployment state folder (default {DEFAULT_STATE})")


def cmd_certs(args: argparse.Namespace) -> int:
    from deploy.certs import DEFAULT_HOSTS, CertError, generate_certs, load_cert, san_names

    try:
        if args.days < 1:
            raise CertError(f"--days {args.days}: a certificate must be valid for at least one day")
        paths = generate_certs(args.dir, hosts=args.host or DEFAULT_HOSTS, days=args.days, overwrite=args.overwrite)
        names = san_names(load_cert(paths.server_cert))
    except CertError as e:
        return _error("certs", e)
    print(f"CA certificate  {paths.ca_cert}  (give it to clients: --root-certificates / root-certificates)")
    print(f"server cert     {paths.server_cert}  for {', '.join(names)}")
    print(f"server key      {paths.server_key}")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from deploy.cluster import UpOptions, flwr_run_command, up
    from deploy.errors import DeployError
    from shared_model.console import parse_sets

    try:
        opts = UpOptions(state=Path(args.state), name=args.name, scenario=args.scenario, nodes=args.nodes,
                         rounds=args.rounds, out=args.out, extra=parse_sets(args.set), port=args.port,
                         node_port=args.node_port, flwr_home=Path(args.flwr_home) if args.flwr_home else None,
                         certs=Path(args.certs) if args.certs else None, timeout=args.timeout)
        dep = up(opts)
    except (DeployError, ValueError) as e:  # ConfigError, CertError and a bad --set are ValueErrors
        return _error("up", e)
    print(f"SuperLink {dep.name!r} on https://{dep.address} (TLS, SuperNode authentication, "
          f"state {Path(args.state) / 'superlink' / 'state.db'})")
    for p in dep.processes:
        print(f"  {p['role']:<12} pid {p['pid']:<8} log {p['log']}")
    for n in dep.nodes:
        print(f"  supernode-{n['index']}: node id {n['node_id']}, shard {n['shard']}")
    print(f"Flower CLI config: {dep.flwr_home}/config.toml  [superlink.{dep.name}]")
    print("Run the federation from the repository root:")
    print(f"  export FLWR_HOME={dep.flwr_home}")
    print(f"  {flwr_run_command(dep)}")
    print(f"Results: {dep.out_dir}/results.json.  Stop: fedrank deploy down --state {args.state}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from deploy.errors import DeployError
    from deploy.supervise import RUN_REPORT, RunOptions, supervise

    def show(ev: dict[str, Any]) -> None:
        if not args.json:
            detail = " ".join(f"{k}={v}" for k, v in ev.items() if k not in ("t", "event"))
            print(f"[{ev['t']:7.1f} s] {ev['event']:<20} {detail}", flush=True)

    try:
        if args.max_resubmits < 0 or args.status_every <= 0:
            raise ValueError("--max-resubmits must be >= 0 and --status-every > 0")
        if args.node_wait < 0:
            raise ValueError(f"--node-wait {args.node_wait}: must be >= 0")
        rep = supervise(RunOptions(state=Path(args.state), max_resubmits=args.max_resubmits,
                                   status_every=args.status_every, limit=args.limit, node_wait=args.node_wait),
                        on_event=show)
    except (DeployError, ValueError) as e:
        return _error("run", e)
    if args.json:
        print(json.dumps(rep, indent=2, default=float))
        return 0
    ndcg = rep["final"].get("ndcg@10", float("nan"))
    print(f"run {rep['run_ids'][-1]}: {rep['rounds_completed']}/{rep['num_rounds']} rounds, lost "
          f"{rep['rounds_lost'] or 'none'}, final ndcg@10 {ndcg:.4f}, {rep['wall_s']:.0f} s; "
          f"{rep['resubmissions']} resubmissions, SuperLink restarts {rep['superlink_restarts']}, "
          f"SuperNode restarts {rep['supernode_restarts']}")
    print(f"Report: {Path(rep['out_dir']) / RUN_REPORT}")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from deploy.cluster import down
    from deploy.errors import DeployError

    try:
        res = down(Path(args.state), grace=args.grace)
    except DeployError as e:
        return _error("down", e)
    if "note" in res:
        print(f"nothing to stop in {res['state']}: {res['note']}")
        return 0
    n = len(res["terminated"]) + len(res["killed"])
    if n == 0:
        print(f"deployment {res['name']!r} in {res['state']}: nothing running")
    else:
        print(f"deployment {res['name']!r}: stopped {n} processes (SIGTERM {res['terminated']}, "
              f"SIGKILL {res['killed']})")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from deploy.cluster import status
    from deploy.errors import DeployError

    try:
        st = status(Path(args.state))
    except DeployError as e:
        return _error("status", e)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"deployment {st['name']!r} on {st['address']} (FLWR_HOME {st['flwr_home']})")
    for p in st["processes"]:
        print(f"  {p['role']:<12} pid {p['pid']:<8} {'running' if p['running'] else 'stopped':<8} {p['log']}")
    return 0
