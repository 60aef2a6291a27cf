"""The README's napari screenshot, made from the real plugin: the synthetic nuclei sample, the Segment widget
opened from the plugin's manifest, the shipped nuclei model run by pressing Run, and `viewer.screenshot` of
the whole window once its labels have landed.

    xvfb-run -a .venv/bin/python scripts/napari_screenshot.py docs/napari.png

(On a desktop, drop xvfb-run; Qt's offscreen platform does not draw the OpenGL canvas into a window
grab, so the script wants a display, real or virtual.) Needs pip install 'unetseg[napari]'.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication


def wait(widget, timeout: float = 300.0) -> None:
    """Let Qt run until the widget's workers are done."""
    end = time.monotonic() + timeout
    while widget.busy:
        if time.monotonic() > end:
            raise TimeoutError(f"the widget is still busy after {timeout:.0f} s: {widget.status.value}")
        QApplication.processEvents()
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/napari.png"), help="the PNG to write")
    args = parser.parse_args()
    viewer = napari.Viewer(title="unetseg in napari")
    viewer.window.resize(1400, 860)
    viewer.open_sample("unetseg", "nuclei")
    _, widget = viewer.window.add_plugin_dock_widget("unetseg", "Segment")
    wait(widget)  # the shipped nuclei model loads, and its stored settings fill the widget
    widget.image.value = viewer.layers["nuclei"]
    widget.run_button.native.click()
    wait(widget)
    viewer.layers["nuclei labels"].contour = 1
    viewer.layers.selection = {viewer.layers["nuclei labels"]}
    viewer.reset_view()
    for _ in range(20):  # let the canvas draw
        QApplication.processEvents()
        time.sleep(0.05)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out), canvas_only=False)
    print(f"{args.out}: {widget.status.value} ({widget.model_info.value})")
    viewer.close()


if __name__ == "__main__":
    main()
