#!/usr/bin/env bash
# The GPU checks in one call (for a machine with CUDA): the gpu-marked tests, then the tiled
# inference benchmark on the GPU. Prints everything; exits non-zero if a test fails.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python -m pytest -q -m gpu tests
python - <<'PY'
import time, torch
from unetseg.inference import predict_tiled
from unetseg.models import UNet
net = UNet(in_channels=1, classes=1, depth=4, width=32).cuda().eval()
image = torch.rand(1, 4096, 4096)
for amp in (False, True):
    predict_tiled(net, image[:, :512, :512], amp=amp)  # warm-up
    torch.cuda.synchronize(); started = time.perf_counter()
    probs = predict_tiled(net, image, tile_size=256, overlap=64, batch_size=32, amp=amp)
    torch.cuda.synchronize(); seconds = time.perf_counter() - started
    print(f"predict_tiled 4096x4096 amp={amp}: {image[0].numel() / seconds / 1e6:.1f} Mpx/s, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
PY
