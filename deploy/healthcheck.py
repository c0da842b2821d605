#!/usr/bin/env python3
"""Container health check: exit 0 when the vLLM server answers GET /health with 200, else 1.

Uses only the standard library (the CPU image has no curl). The port comes from the first argument, else
the PORT environment variable the entrypoint also reads, else 8000.

    python3 healthcheck.py [PORT]
"""

from __future__ import annotations

import logging
import os
import sys
import urllib.error
import urllib.request

log = logging.getLogger("armor-healthcheck")


def check(port: int, host: str = "127.0.0.1", timeout: float = 5.0) -> bool:
    url = f"http://{host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            ok = response.status == 200
            if not ok:
                log.error("%s answered %d", url, response.status)
            return ok
    except (urllib.error.URLError, OSError) as err:
        log.error("%s: %s", url, err)
        return False


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    raw = args[0] if args else os.environ.get("PORT", "8000")
    try:
        port = int(raw)
    except ValueError:
        log.error("port must be a number, got %r", raw)
        return 2
    return 0 if check(port) else 1


if __name__ == "__main__":
    sys.exit(main())
