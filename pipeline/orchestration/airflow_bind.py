"""Refuse Airflow's all-admins mode (no login, everyone admin) on anything but loopback.

dags/run_airflow.sh runs `python -m pipeline.orchestration.airflow_bind <airflow arguments>` before
any `airflow` command while all-admins mode may be on. The address is the one Airflow itself would
bind, found the way Airflow finds it, so no way of setting it slips past:

- `api-server -H/--host ADDRESS` (also `--host=ADDRESS`, `-HADDRESS` and argparse's abbreviations
  such as `--ho`): Airflow's own CLI parser reads the arguments;
- otherwise `[api] host` from Airflow's configuration: AIRFLOW__API__HOST (LEANREC_AIRFLOW_HOST
  through the launcher), its _CMD / _SECRET forms, airflow.cfg in $AIRFLOW_HOME or $AIRFLOW_CONFIG;
  `standalone` starts `airflow api-server` with no arguments, so that value;
- `[api] server_type = gunicorn` with GUNICORN_CMD_ARGS set: gunicorn may bind elsewhere; refused.

All-admins is on when Airflow's configuration says so (`[core] simple_auth_manager_all_admins`:
true, t, 1, ... in any case, from the environment or airflow.cfg). The address is loopback when it
resolves, every address it resolves to, into 127.0.0.0/8 or ::1: `0.0.0.0`, `::`, `[::]`, an empty
host, a LAN address and a hostname that resolves to one are refused, and so is a name that does
not resolve.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import sys

logger = logging.getLogger(__name__)

def is_loopback(host: str) -> bool:
    """Whether every address `host` resolves to is a loopback address (an unresolvable name is not)."""
    name = host.strip()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if not name:
        return False  # an empty host binds every interface
    try:
        infos = socket.getaddrinfo(name, None)
    except (socket.gaierror, UnicodeError):
        return False
    addresses = {info[4][0].split("%", 1)[0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(address).is_loopback for address in addresses)


def api_server_host(argv: list[str]) -> str:
    """The address an API server started by `airflow *argv` binds to: `api-server`'s -H/--host, else
    (`standalone`, or any other command: where a server with this configuration would bind) `[api] host`."""
    if argv and argv[0] == "api-server":
        from airflow.cli.cli_parser import get_parser

        return get_parser().parse_args(argv).host
    from airflow.configuration import conf

    return conf.get("api", "host")


def all_admins() -> bool:
    from airflow.configuration import conf

    return conf.getboolean("core", "simple_auth_manager_all_admins", fallback=False)


def refusal(argv: list[str]) -> str | None:
    """Why `airflow *argv` must not run (all-admins mode off loopback), or None when it may.

    Any command is refused while all-admins mode is configured off loopback, not only those that
    start the API server: the next `api-server` or `standalone` would serve it."""
    if not all_admins():
        return None
    from airflow.configuration import conf

    if conf.get("api", "server_type", fallback="uvicorn").lower() == "gunicorn" and os.environ.get("GUNICORN_CMD_ARGS"):
        return "refusing all-admins mode (no login) with GUNICORN_CMD_ARGS set: it can bind gunicorn anywhere"
    host = api_server_host(argv)
    if not is_loopback(host):
        return (f"refusing all-admins mode (no login) on {host!r}: loopback only (127.0.0.1, ::1, localhost); "
                "set LEANREC_AIRFLOW_ALL_ADMINS=false to log in instead")
    return None


def main(argv: list[str] | None = None) -> int:
    reason = refusal(list(sys.argv[1:] if argv is None else argv))
    # Importing Airflow configured the root logger (to stdout): the refusal goes to stderr on its own.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    if reason:
        logger.error("%s", reason)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
