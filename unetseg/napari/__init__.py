"""The napari plugin (`pip install 'unetseg[napari]'`): segment, correct and fine-tune in the viewer.

Its contributions are declared in `napari.yaml` (an npe2 manifest, found through the package's
`napari.manifest` entry point): the Segment and Fine-tune widgets (`widgets`), the synthetic nuclei
as sample data (`sample_data`), and writers of a labels layer as an ImageJ ROI set and a CSV of
object measurements (`writers`). napari imports each module only when its contribution is used.
Nothing else in unetseg imports this package, so unetseg itself never needs napari or Qt.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)


def avoid_llvm_clash(maps: str | Path = "/proc/self/maps") -> bool:
    """Keep torch from importing triton into a process whose OpenGL driver has loaded LLVM; True if it did.

    Mesa's drivers (llvmpipe, radeonsi) load their libLLVM with global symbols when napari's canvas makes its
    GL context; triton (imported by torch._dynamo, which torchvision and so torchmetrics import) bundles another
    LLVM, and loading it then crashes the process in LLVM's initialisers. Marking triton absent makes torch
    take its path for machines without triton: only `torch.compile` on GPUs, which the plugin does not use,
    needs it. Where triton is already imported, or no LLVM is loaded, nothing changes.
    """
    if "triton" in sys.modules:
        return False
    try:
        loaded = Path(maps).read_text()
    except OSError:  # not Linux: Mesa's LLVM is a Linux driver matter
        return False
    if "libLLVM" not in loaded:
        return False
    sys.modules["triton"] = None  # `import triton` now raises ImportError, as without triton
    log.debug("the OpenGL driver loaded LLVM: triton is kept out of this process")
    return True
