"""``fedrank deploy {server,register,node-key,node}``: the commands of a deployment across hosts, registered by
:func:`add_remote_commands` (from :func:`deploy.cli.add_commands`). Exit codes as for the other ``deploy``
commands: 0 ok; 2 input the command cannot use, one line naming the flag or file; 1 a process that would not start
or a node the SuperLink refused, with the tail of its log.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from deploy.errors import report as _error


def add_remote_commands(sub: Any) -> None:
    """``server`` (the SuperLink's host), ``node-key`` and ``node`` (each device's host)."""
    from deploy.device import DEFAULT_LOCAL_PORT, DEFAULT_NODE_STATE
    from deploy.remote import DEFAULT_SERVER_STATE

    sv = sub.add_parser("server", help="the SuperLink for devices on other hosts: TLS for --host, their keys "
                                       "registered",
                        description="On the server host: prepare the run's data, make a CA and a server "
                                    "certificate for --host, start flower-superlink bound to --host:--port (TLS, "
                                    "SuperNode authentication, database) and register each device's public key. "
                                    "Then `fedrank deploy run --state STATE` waits for the devices and runs.")
    sv.add_argument("--state", default=DEFAULT_SERVER_STATE, help=f"state folder (default {DEFAULT_SERVER_STATE})")
    sv.add_argument("--host", required=True, help="the address devices reach the SuperLink at (an IP address or "
                                                  "name of this host; the SuperLink binds it)")
    sv.add_argument("--port", type=int, default=9093, help="the SuperLink's port, all APIs over TLS (default 9093)")
    sv.add_argument("--node-key", action="append", type=Path, default=[], metavar="FILE.pub",
                    help="a device's public key (from `fedrank deploy node-key`; repeatable)")
    sv.add_argument("--node-keys", action="append", type=Path, default=[], metavar="DIR",
                    help="a folder of devices' *.pub files (repeatable); keys are registered in file-name order, "
                         "the i-th one for partition i")
    sv.add_argument("--san", action="append", default=[], metavar="NAME",
                    help="another name or address for the server certificate (repeatable)")
    sv.add_argument("--name", default="fedrank", help="SuperLink connection name in $FLWR_HOME/config.toml")
    sv.add_argument("--scenario", help="run-config overrides from simulations/scenarios/NAME.toml (or a path)")
    sv.add_argument("--nodes", type=int, help="partition.num-clients (default: the number of device keys)")
    sv.add_argument("--rounds", type=int, help="server.num-rounds")
    sv.add_argument("--out", help="server.out-dir of the run (made absolute)")
    sv.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a run-config value (repeatable)")
    sv.add_argument("--flwr-home", help="where the Flower CLI config goes (default $FLWR_HOME, else STATE/flwr-home)")
    sv.add_argument("--certs", help="use the TLS files in this folder instead of STATE/certs")
    sv.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the SuperLink")
    sv.set_defaults(func=cmd_server)

    rg = sub.add_parser("register", help="register more devices' public keys with a running `deploy server`",
                        description="Register each key with the SuperLink of a `fedrank deploy server` folder (keys "
                                    "registered already are skipped); tell each new device its partition.")
    rg.add_argument("--state", default=DEFAULT_SERVER_STATE, help=f"state folder (default {DEFAULT_SERVER_STATE})")
    rg.add_argument("--node-key", action="append", type=Path, default=[], metavar="FILE.pub",
                    help="a device's public key (repeatable)")
    rg.add_argument("--node-keys", action="append", type=Path, default=[], metavar="DIR",
                    help="a folder of devices' *.pub files (repeatable)")
    rg.set_defaults(func=cmd_register)

    k = sub.add_parser("node-key", help="make this device's SuperNode key pair (the .pub goes to the operator)",
                       description="Write an EC P-384 key pair in OpenSSH format: OUT (private, mode 0600, stays "
                                   "on the device) and OUT.pub (for `fedrank deploy server --node-key`). An "
                                   "existing pair is kept unless --overwrite.")
    k.add_argument("--out", type=Path, default=Path("runs/node.key"), help="private key path (default runs/node.key)")
    k.add_argument("--overwrite", action="store_true", help="replace an existing key pair")
    k.set_defaults(func=cmd_node_key)

    n = sub.add_parser("node", help="this device's SuperNode, connected to a remote SuperLink",
                       description="Start flower-supernode: TLS to --superlink trusting --ca only, signed in with "
                                   "--key, training on --data; its local API on 127.0.0.1 over TLS. Retries the "
                                   "SuperLink without limit (rides out network outages). Runs in the background "
                                   "(`fedrank deploy status/down --state STATE`) unless --foreground.")
    n.add_argument("--state", default=DEFAULT_NODE_STATE, help=f"state folder (default {DEFAULT_NODE_STATE})")
    n.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the SuperLink as this device reaches it")
    n.add_argument("--ca", required=True, type=Path, help="the SuperLink's CA certificate (its STATE/certs/ca.crt)")
    n.add_argument("--key", required=True, type=Path, help="this device's private key (fedrank deploy node-key)")
    n.add_argument("--data", required=True, type=Path, help="this device's shard (.npz)")
    n.add_argument("--partition-id", required=True, type=int, help="the partition this device holds")
    n.add_argument("--num-partitions", type=int, help="the number of partitions (the run's partition.num-clients)")
    n.add_argument("--local-port", type=int, default=DEFAULT_LOCAL_PORT,
                   help=f"port of the SuperNode's local API on 127.0.0.1 (default {DEFAULT_LOCAL_PORT})")
    n.add_argument("--max-retries", type=int, help="give up after this many failed connection attempts "
                                                   "(default: never)")
    n.add_argument("--timeout", type=float, default=120.0,
                   help="seconds to wait for the SuperLink to accept the node (0: do not wait)")
    n.add_argument("--foreground", action="store_true", help="become the SuperNode (for systemd and the like)")
    n.set_defaults(func=cmd_node)


def cmd_server(args: argparse.Namespace) -> int:
    from deploy.errors import DeployError
    from deploy.remote import ServerOptions, node_command, server
    from shared_model.console import parse_sets

    try:
        opts = ServerOptions(host=args.host, state=Path(args.state), port=args.port, name=args.name,
                             node_keys=args.node_key, key_dirs=args.node_keys, san=args.san, scenario=args.scenario,
                             nodes=args.nodes, rounds=args.rounds, out=args.out, extra=parse_sets(args.set),
                             flwr_home=Path(args.flwr_home) if args.flwr_home else None,
                             certs=Path(args.certs) if args.certs else None, timeout=args.timeout)
        dep = server(opts)
    except (DeployError, ValueError) as e:
        return _error("server", e)
    sl = next(p for p in dep.processes if p["role"] == "superlink")
    print(f"SuperLink {dep.name!r} on https://{dep.address} (TLS, SuperNode authentication, pid {sl['pid']}, "
          f"log {sl['log']})")
    print(f"CA certificate for the devices: {Path(dep.certs_dir) / 'ca.crt'}")
    n = len(dep.nodes)
    for node in dep.nodes:
        print(f"  {node['name']:<16} node id {node['node_id']:<22} partition {node['partition_id']}  "
              f"(demo shard {node['shard']})")
    if dep.nodes:
        print("On each device (its own key, shard and partition):")
        print(f"  {node_command(dep, dep.nodes[0], n)}")
    print(f"Then here: fedrank deploy run --state {args.state}    (waits for the devices, runs, supervises)")
    print(f"Flower CLI config: {dep.flwr_home}/config.toml  [superlink.{dep.name}].  "
          f"Stop: fedrank deploy down --state {args.state}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from deploy.errors import DeployError
    from deploy.remote import register_keys

    try:
        added = register_keys(Path(args.state), args.node_key, args.node_keys)
    except (DeployError, ValueError) as e:
        return _error("register", e)
    if not added:
        print("every key was registered already")
    for node in added:
        print(f"  {node['name']:<16} node id {node['node_id']}  registered")
    return 0


def cmd_node_key(args: argparse.Namespace) -> int:
    from deploy.device import node_key
    from deploy.errors import DeployError

    try:
        key, made = node_key(args.out, overwrite=args.overwrite)
    except (DeployError, ValueError) as e:
        return _error("node-key", e)
    print(f"{'new' if made else 'existing'} key pair: {key.private} (private, keep it on this device)")
    print(f"public key for the operator: {key.public}  (fedrank deploy server --node-key {key.public.name})")
    print(key.public.read_text().strip())
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from deploy.device import NodeOptions, exec_node, start_node
    from deploy.errors import DeployError

    try:
        opts = NodeOptions(superlink=args.superlink, ca=args.ca, key=args.key, data=args.data,
                           partition_id=args.partition_id, num_partitions=args.num_partitions,
                           state=Path(args.state), local_port=args.local_port, max_retries=args.max_retries,
                           timeout=args.timeout)
        if args.foreground:
            exec_node(opts)
        dep = start_node(opts)
    except (DeployError, ValueError) as e:
        return _error("node", e)
    proc = dep.processes[-1]
    node_id = dep.nodes[0]["node_id"]
    state = f"accepted by the SuperLink as node {node_id}" if node_id else "started (not waiting for the SuperLink)"
    print(f"SuperNode for partition {args.partition_id} {state}: pid {proc['pid']}, log {proc['log']}")
    print(f"Status: fedrank deploy status --state {args.state}.  Stop: fedrank deploy down --state {args.state}")
    return 0
