"""Curation throughput: does darkroom itself ever become the bottleneck?

200 real JPEG photos sit in the Immich stand-in (previews 1440 px on the short side); the
Ollama stand-in answers every call after 50 ms with 4 parallel slots.  The stand-ins run
in a child process so their own work (rendering previews, checking the spec) does not
share darkroom's interpreter.  darkroom then curates and writes back everything; the
figure is photos per second against the hard limit ``slots / (latency × calls per
photo)``, and darkroom's own CPU time per photo.

    python bench/curation.py [--photos 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from daemon import curate, writeback  # noqa: E402
from daemon.discover import discover  # noqa: E402
from daemon.orientation import ANGLES  # noqa: E402
from daemon.pipeline import drain, open_context  # noqa: E402
from daemon.settings import load_settings  # noqa: E402

SLOTS = 4
LATENCY_S = 0.05
CALLS_PER_PHOTO = 2 + len(ANGLES)  # describe, score, four orientation views
PREVIEW_SHORT_SIDE = 1440
TARGET_RATIO = 0.9

# The child: both stand-ins, a library of real photos big enough for a 1440 px preview.
STAND_INS = f"""
import io, json, sys
import httpx
from PIL import Image
from tests.immich_library import make_jpeg, SAMPLE_PHOTOS
from tests.immich_server import ImmichServer
from tests.ollama_server import Answer, OllamaServer
from daemon.scoring import FACTORS

def answer(request):
    if "rotate_clockwise" in request.prompt:
        return Answer.json({{"rotate_clockwise": 0}})
    if request.schema is not None:
        return Answer.json(dict.fromkeys(FACTORS, 7))
    return "A photograph of a quiet scene in soft evening light, seen from the side."

photos = int(sys.argv[1])
immich = ImmichServer(spec=None).start()  # spec checks are the tests' job
names = sorted(SAMPLE_PHOTOS)
short = {{name: min(Image.open(io.BytesIO(make_jpeg(name))).size) for name in names}}
for index in range(photos):
    name = names[index % len(names)]
    # Each photo a little different (its own checksum), all >= 1440 px on the short side.
    scale = ({PREVIEW_SHORT_SIDE} + 1 + index // len(names)) / short[name]
    immich.add_asset(make_jpeg(name, scale=scale))
for asset_id in list(immich.library.assets):  # Immich renders previews at upload
    httpx.get(f"{{immich.url}}/api/assets/{{asset_id}}/thumbnail", params={{"size": "preview"}},
              headers={{"x-api-key": immich.api_key}}, timeout=60).raise_for_status()
ollama = OllamaServer(answer, num_parallel={SLOTS}, latency={LATENCY_S}).start()
print(json.dumps({{"immich": immich.url, "key": immich.api_key, "ollama": ollama.url}}), flush=True)
sys.stdin.read()
"""


def start_stand_ins(photos: int) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The child process with both servers, and their addresses."""
    child = subprocess.Popen(
        [sys.executable, "-c", STAND_INS, str(photos)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    return child, json.loads(child.stdout.readline())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=200)
    args = parser.parse_args()
    child, where = start_stand_ins(args.photos)
    try:
        with tempfile.TemporaryDirectory() as state:
            env = {
                "DARKROOM_PATHS__STATE_DIR": state,
                "DARKROOM_IMMICH__URL": where["immich"],
                "DARKROOM_IMMICH__API_KEY": where["key"],
                "DARKROOM_OLLAMA__HOSTS": where["ollama"],
                "DARKROOM_OLLAMA__PARALLEL": str(SLOTS),
            }
            ctx = open_context(load_settings(None, env))
            discover(ctx.store, ctx.immich, ctx.settings.discovery)
            wall, cpu = time.perf_counter(), time.process_time()
            child_cpu = cpu_seconds(child.pid)
            drain(ctx, curate.STAGE)
            drain(ctx, writeback.STAGE)  # anything left over; normally nothing
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            child_cpu = cpu_seconds(child.pid) - child_cpu
            written = ctx.store.stage_counts()[writeback.STAGE].get("done", 0)
            ctx.close()
    finally:
        child.stdin.close()  # type: ignore[union-attr]
        child.wait()
    if written != args.photos:
        print(f"curation: only {written} of {args.photos} photos were written back")
        return 1
    rate = args.photos / wall
    limit = SLOTS / (LATENCY_S * CALLS_PER_PHOTO)
    ratio = rate / limit
    print(f"photos: {args.photos}, calls per photo: {CALLS_PER_PHOTO}, slots: {SLOTS}")
    print(f"throughput: {rate:.2f} photos/s; limit {limit:.2f} photos/s")
    print(f"darkroom CPU per photo: {1000 * cpu / args.photos:.1f} ms")
    print(f"stand-ins' CPU per photo: {1000 * child_cpu / args.photos:.1f} ms")
    print(f"curation: {ratio:.3f} of the limit (target: >= {TARGET_RATIO})")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
