"""Regenerates docs/explorer-llama-block.png: examples/llama-lora.yaml on tiny-llama, captured
(left) and rewritten (right) in Model Explorer, layer 0's attention open, taken by the test
suite's headless Chromium harness (tests/browser.py).

    .venv/bin/python docs/explorer_screenshot.py
"""

import pathlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from browser import Chromium  # noqa: E402

import peftc  # noqa: E402
from peftc import explorer  # noqa: E402
from peftc.models import example_inputs, tiny_model  # noqa: E402


def main(out=ROOT / "docs" / "explorer-llama-block.png", module="model.layers.0.self_attn", select="linear_2",
         zoom_out: int = 1):
    cm = peftc.compile(tiny_model("tiny-llama"), peftc.Spec.load(ROOT / "examples" / "llama-lora.yaml"),
                       example_inputs("tiny-llama"))
    export = pathlib.Path(tempfile.mkdtemp(prefix="peftc-explorer-"))
    explorer.build(cm.captured_graph, cm.graph_module, label="tiny-llama").export(export)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "peftc.explorer", str(export), "--no-browser", "--port",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                urllib.request.urlopen(f"http://localhost:{port}/check_health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        with Chromium(width=1600, height=1000) as page:
            page.goto(explorer.url(export, module=module, select=select, port=port))
            page.wait_for("document.body && /peftc method\\s/.test(document.body.innerText)", timeout=60)
            time.sleep(2)
            for x in (190, 990):  # zoom each pane out a little (Ctrl+wheel), to show more of the block
                for _ in range(zoom_out):
                    page.call("Input.dispatchMouseEvent", type="mouseWheel", x=x, y=500, deltaX=0, deltaY=60,
                              modifiers=2)
                    time.sleep(0.2)
            time.sleep(2)
            out.write_bytes(page.screenshot())
    finally:
        server.terminate()
        server.wait(10)
    print(f"wrote {out}")


if __name__ == "__main__":
    main(zoom_out=int(sys.argv[1]) if len(sys.argv) > 1 else 1)
