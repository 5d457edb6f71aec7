"""Run the Dropbox test server by hand (TEST INFRASTRUCTURE, not Dropbox).

    python -m tests.dropbox_server --root DIR [--port N] [--team] [--token-lifetime S]

Prints the address, the CA certificate, credentials and the environment variables that point
an SDK client (for example `python app.py` in another shell) at it; runs until Ctrl-C.
"""

from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading

from .server import DropboxTestServer


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.dropbox_server",
        description="Local Dropbox API v2 test server (test infrastructure; not Dropbox).")
    parser.add_argument("--root", required=True, help="folder for the server's state and files")
    parser.add_argument("--port", type=int, default=0, help="port (default: any free port)")
    parser.add_argument("--team", action="store_true", help="model a team (Business) member")
    parser.add_argument("--token-lifetime", type=float, default=14_400,
                        help="access-token lifetime in seconds (default 14400)")
    parser.add_argument("--quota-gb", type=float, default=None, help="allocated space in GB")
    args = parser.parse_args(argv)

    kwargs = {"port": args.port, "team": args.team, "token_lifetime_s": args.token_lifetime,
              "request_log_limit": 100_000}
    if args.quota_gb is not None:
        kwargs["quota_bytes"] = int(args.quota_gb * 10 ** 9)
    server = DropboxTestServer(args.root, **kwargs)
    env = server.client_env()
    print("Dropbox test server (TEST INFRASTRUCTURE - not Dropbox) listening on %s" % server.url)
    print("CA certificate : %s" % server.ca_file)
    print("state folder   : %s" % server.root_dir)
    print("access token   : %s" % server.access_token)
    print("refresh token  : %s" % server.refresh_token)
    print("app key        : %s" % server.app_key)
    print("account        : %s (%s)" % (server.account_id, "team" if args.team else "personal"))
    print("\nexport these in the client's shell:")
    for name, value in env.items():
        print("export %s=%s" % (name, shlex.quote(value)))
    print("export DROPBOX_APP_KEY=%s" % shlex.quote(server.app_key))
    print("export DROPBOX_REFRESH_TOKEN=%s" % shlex.quote(server.refresh_token))
    print("\nrequest log: %s/requests.jsonl   (Ctrl-C to stop)" % server.root_dir, flush=True)

    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    try:
        while not done.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    server.stop()
    print("stopped.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
