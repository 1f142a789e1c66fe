"""Render the stability panels of a run to a PNG with headless Chromium, for the documentation.

    python docs/tools/render_panels.py runs/demo/version_0 docs/img/panels.png

Starts TensorBoard on a free loopback port for LOGDIR, opens its Custom Scalars tab in headless
Chromium (``chromium``, from the system's packages) and saves a screenshot. Not part of CI.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("logdir")
    parser.add_argument("out", nargs="?", default="docs/img/panels.png")
    parser.add_argument("--tab", default="custom_scalars", help="the TensorBoard tab to render")
    parser.add_argument("--size", default="1400,1500", help="window width,height in pixels")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("render_panels: no Chromium found (apt-get install chromium)", file=sys.stderr)
        return 2
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", args.logdir, "--host", "127.0.0.1",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/data/plugin/custom_scalars/layout", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--window-size={args.size}", "--virtual-time-budget=20000",
                        f"--screenshot={os.path.abspath(args.out)}", f"http://127.0.0.1:{port}/#{args.tab}"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
