"""TTA views through the network in one batch of 8 x batch_size (before 8984fb5) or batch_size tiles at a time
(after), alternated on the same DSB2018 images in one run; prints s/image of each and their largest difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_tta_batches.py [IMAGES]   # default 8
"""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from bench_ensemble import DATA, select_images  # benchmarks/ is the script's folder

from unetseg.inference import engine
from unetseg.inference.loading import load_predictor
from unetseg.inference.pipeline import PredictSettings, predict_image
from unetseg.inference.tiling import TilingConfig

MODEL = Path(__file__).resolve().parents[1] / "unetseg" / "weights" / "nuclei.ckpt"


def one_batch_forward(self, tiles: torch.Tensor) -> torch.Tensor:
    """`BlockPredictor.forward` as it was before 8984fb5: the 8 views of a batch in one forward pass."""
    inputs = engine._dihedral_views(tiles) if self.tta else tiles
    inputs = inputs.contiguous(memory_format=self.memory_format)
    precision = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype is not None else nullcontext()
    with precision:
        logits = self.model(inputs)
    logits = logits.float().contiguous()
    probs = logits.sigmoid_() if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
    return engine._merge_dihedral(probs) if self.tta else probs


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    _, images, _ = select_images(DATA, count)
    model, spec = load_predictor(str(MODEL), "cpu")
    settings = PredictSettings("prob", tiling=TilingConfig(tta=True))
    variants = {"one batch of 8 x batch_size": one_batch_forward, "batch_size at a time": engine.BlockPredictor.forward}
    seconds = dict.fromkeys(variants, 0.0)
    predict_image(model, spec, images[0], settings)  # warm-up
    largest = 0.0
    for image in images:
        results = []
        for name, forward in variants.items():
            engine.BlockPredictor.forward = forward
            start = time.perf_counter()
            results.append(predict_image(model, spec, image, settings))
            seconds[name] += time.perf_counter() - start
        largest = max(largest, float(np.abs(results[0] - results[1]).max()))
    before, after = (seconds[name] / len(images) for name in variants)
    print(f"TTA, shipped nuclei model, {len(images)} DSB2018 images, {torch.get_num_threads()} thread(s):")
    print(f"  s/image: one batch of 8 x batch_size {before:.3f}, batch_size at a time {after:.3f}")
    print(f"  speed-up {before / after:.2f}x; largest probability difference {largest:.2e}")


if __name__ == "__main__":
    main()
