"""Discovery at scale: a first full sync of 100,000 assets, and what a quiet poll costs.

The Immich stand-in (in a child process, spec checks off: they are the tests' job) holds
100,000 assets.  Side by side, five times each, alternating:

* a bare loop that only pages through the same search results (httpx, JSON, nothing else);
* darkroom's first full sync into an empty store (typed models, owner filter, upserts),
  run in a process of its own so its peak RSS can be read.

The figure is darkroom's rate as a fraction of the bare loop's (best run of each).  Then
a poll with nothing new must cost at most 3 requests, whatever the library size.

    python bench/discovery.py [--assets 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
TARGET_RATIO = 0.8
TARGET_RSS_MB = 300
TARGET_QUIET_REQUESTS = 3
PAGE_SIZE = 1000
VISIBILITIES = ("timeline", "archive")
ROUNDS = 5
# The stand-in stamps changes at least 1 ms apart, so 101,000 assets made in a few seconds
# carry updatedAt up to ~100 s in the future, about 1,000 per second of stamp. A margin of
# 0.2 s keeps the re-read window as thin as a real library's quiet window.
MARGIN_S = 0.2
KIB_PER_MB = 1024

STAND_IN = """
import sys, json
from tests.immich_server import ImmichServer
server = ImmichServer(spec=None).start()
photo = b"\\xff\\xd8 a shared body: checksums come from the per-asset suffix"
for index in range(int(sys.argv[1])):
    server.add_asset(photo + index.to_bytes(4, "big"), visibility="archive" if index % 10 == 0
                     else "timeline")
partner = server.add_user("Partner")
for index in range(1000):
    server.add_asset(photo + b"p" + index.to_bytes(4, "big"), owner_id=partner)
print(json.dumps({"url": server.url, "key": server.api_key}), flush=True)
sys.stdin.read()
"""

# darkroom's side, in its own process: one full sync, then a quiet poll.
SYNC = """
import json, resource, sys, time
from pathlib import Path
from daemon.discover import discover
from daemon.immich import open_immich
from daemon.settings import load_settings
from daemon.store import Store

env = json.loads(sys.argv[1])
settings = load_settings(None, env)
calls = []
store = Store(settings.paths.database)
immich = open_immich(settings, observer=lambda *event: calls.append(event))
started = time.perf_counter()
first = discover(store, immich, settings.discovery)
seconds = time.perf_counter() - started
time.sleep(settings.discovery.safety_margin_s + 0.2)
calls.clear()
quiet = discover(store, immich, settings.discovery)
print(json.dumps({
    "seconds": seconds,
    "new": first.counts.new,
    "quiet_requests": len(calls),
    "quiet_new": quiet.counts.new,
    "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
}))
"""


def bare_loop(url: str, key: str) -> tuple[float, int]:
    """Page through every visibility with nothing but httpx; (seconds, items)."""
    items = 0
    started = time.perf_counter()
    with httpx.Client(base_url=url + "/api", headers={"x-api-key": key}, timeout=60) as http:
        for visibility in VISIBILITIES:
            page: int | None = 1
            while page is not None:
                body = {"size": PAGE_SIZE, "withDeleted": True, "visibility": visibility}
                answer = http.post("/search/metadata", json=body | {"page": page}).json()
                items += len(answer["assets"]["items"])
                next_page = answer["assets"]["nextPage"]
                page = int(next_page) if next_page else None
    return time.perf_counter() - started, items


def darkroom_sync(url: str, key: str) -> dict[str, float]:
    """One full sync into an empty store, in a fresh process."""
    with tempfile.TemporaryDirectory() as state:
        env = {
            "DARKROOM_PATHS__STATE_DIR": state,
            "DARKROOM_IMMICH__URL": url,
            "DARKROOM_IMMICH__API_KEY": key,
            "DARKROOM_DISCOVERY__SAFETY_MARGIN_S": str(MARGIN_S),
        }
        result = subprocess.run(
            [sys.executable, "-c", SYNC, json.dumps(env)],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(result.stdout.splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assets", type=int, default=100_000)
    args = parser.parse_args()
    child = subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(args.assets)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdin is not None
    where = json.loads(child.stdout.readline())
    try:
        bare_loop(where["url"], where["key"])  # warm the stand-in's search cache
        bare_runs, syncs = [], []
        for _ in range(ROUNDS):
            bare_runs.append(bare_loop(where["url"], where["key"]))
            syncs.append(darkroom_sync(where["url"], where["key"]))
    finally:
        child.stdin.close()
        child.wait()
    bare_s, items = min(bare_runs)
    best = min(syncs, key=lambda run: run["seconds"])
    ratio = bare_s / best["seconds"]
    rss_mb = max(run["peak_rss_kib"] for run in syncs) / KIB_PER_MB
    quiet = max(run["quiet_requests"] for run in syncs)
    print(f"assets paged: {items} (the owner's {best['new']:.0f} stored, partners' filtered)")
    print(f"bare paging: {items / bare_s:.0f} assets/s; darkroom sync: "
          f"{items / best['seconds']:.0f} assets/s")  # fmt: skip
    print(f"darkroom peak RSS: {rss_mb:.0f} MB (target: <= {TARGET_RSS_MB})")
    print(f"quiet poll: {quiet} requests (target: <= {TARGET_QUIET_REQUESTS})")
    print(f"discovery: {ratio:.2f} of the bare paging rate (target: >= {TARGET_RATIO})")
    met = ratio >= TARGET_RATIO and rss_mb <= TARGET_RSS_MB and quiet <= TARGET_QUIET_REQUESTS
    return 0 if met and best["new"] == args.assets else 1


if __name__ == "__main__":
    sys.exit(main())
