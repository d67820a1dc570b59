"""The Model Explorer view of a tiny Llama's LoRA rewrite, loaded in headless Chromium.

Serves the static export with Model Explorer's own server (``python -m peftc.explorer``) and
checks from the page that both panes processed their graph, that the selected LoRA node
carries the method overlay, and, from a screenshot, that the rewritten pane painted LoRA nodes
in their overlay colour while the captured pane (nothing inserted) has none.
"""

import io
import re
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from browser import Chromium, find_chromium

pytestmark = pytest.mark.browser

if find_chromium() is None:
    pytest.skip("no Chromium found (apt-get install chromium, or set PEFTC_CHROMIUM)", allow_module_level=True)
pytest.importorskip("model_explorer", reason="Model Explorer is not installed (pip install 'peftc[explorer]')")
pytest.importorskip("websocket", reason="websocket-client is not installed (a dev dependency)")

import peftc  # noqa: E402
from peftc import explorer  # noqa: E402
from peftc.models import example_inputs, tiny_model  # noqa: E402

MODULE = "model.layers.0.self_attn.q_proj"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://localhost:{port}/check_health", timeout=2).read() == b"model_explorer_ok":
                return
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"Model Explorer server did not come up (exit code {server.poll()})")
        time.sleep(0.2)


def canvas_pixels(png: bytes, rect) -> np.ndarray:
    import matplotlib.image as mpimg

    img = (mpimg.imread(io.BytesIO(png), format="png")[..., :3] * 255).round().astype(int)
    x, y, w, h = (int(round(v)) for v in rect)
    return img[y:y + h, x:x + w]


def count_colour(pixels: np.ndarray, hex_colour: str) -> int:
    rgb = [int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((pixels == rgb).all(-1).sum())


def test_rewritten_graph_renders_with_lora_overlay(tmp_path):
    spec = {"methods": [{"lora": {"targets": ["q_proj", "v_proj"], "r": 4}}]}
    cm = peftc.compile(tiny_model("tiny-llama"), spec, example_inputs("tiny-llama"))
    explorer.build(cm.captured_graph, cm.graph_module, label="tiny-llama").export(tmp_path)
    lora_a = next(n.name for n in cm.graph_module.graph.nodes
                  if n.meta.get("peftc", {}).get("role") == "lora_A" and n.meta["peftc"]["module"] == MODULE)
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "peftc.explorer", str(tmp_path), "--no-browser",
                               "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, server)
        with Chromium(width=1400, height=900) as page:
            page.goto(explorer.url(tmp_path, module=MODULE, select=lora_a, port=port))
            text = "document.body ? document.body.innerText : ''"
            page.wait_for(f"({text}).includes('peftc.role')", timeout=60)  # the LoRA node is selected
            page.wait_for(f"/peftc method\\s+lora/.test({text})", timeout=30)  # ... and has the overlay value
            time.sleep(1.5)  # one more frame after the last layout
            body = page.evaluate(text)
            rects = page.evaluate("[...document.querySelectorAll('canvas')].map(c => c.getBoundingClientRect())"
                                  ".filter(r => r.width > 100).map(r => [r.x, r.y, r.width, r.height])")
            png = page.screenshot()
    finally:
        server.terminate()
        server.wait(10)
    # the rewritten pane lists the selected node's peftc meta, and the overlay's value for it
    assert re.search(r"peftc\.method\s+lora\s+peftc\.adapter\s+default\s+peftc\.role\s+lora_A", body)
    assert re.search(r"peftc method\s+lora", body)
    assert len(rects) == 2 and rects[0][0] < rects[1][0]  # two panes: captured left, rewritten right
    captured, rewritten = (canvas_pixels(png, r) for r in rects)
    colour = explorer.PALETTE[0]  # the only method in the graph
    assert count_colour(rewritten, colour) > 3000  # several LoRA nodes painted (a node is ~4000 px)
    assert count_colour(captured, colour) == 0  # nothing inserted in the captured graph
    for pane in (captured, rewritten):  # both panes drew a graph (nodes, edges, labels), not a blank
        assert (pane.sum(-1) < 600).sum() > 2000
