"""Peak extra resident memory of one compression: ``python memory_scale_script.py METHOD BLOCKS``.

``python memory_scale_script.py svd_llm BLOCKS GIB`` sets SVD-LLM's statistics_budget_gb (default 0).

Prints ``{"extra_mib": ...}``: the process's peak resident set size during ``compress`` minus its size just
before (the peak is reset first through /proc/self/clear_refs, so building the model does not count). Run in a
fresh process per measurement, with glibc's mmap threshold fixed so that freed tensors go back to the OS.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

from prehab.callbacks import AASVD, SAESSVD, SVDLLM  # noqa: E402


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> None:
    method, blocks = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = tiny_llama(
        vocab_size=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=blocks, num_key_value_heads=4
    ).eval()
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(3, 64, (4, 64), generator=generator)} for _ in range(4)]
    callback = {
        "svd_llm": lambda: SVDLLM(
            ratio=0.3, calibration_batches=4, statistics_budget_gb=float(sys.argv[3]) if len(sys.argv) > 3 else 0
        ),
        "aa_svd": lambda: AASVD(ratio=0.3, calibration_batches=4),
        "saes_svd": lambda: SAESSVD(ratio=0.3, calibration_batches=4),
    }[method]()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current size
    before = _status("VmRSS")
    callback.compress(model, batches, progress=False)
    print(json.dumps({"extra_mib": (_status("VmHWM") - before) / 2**20}))


if __name__ == "__main__":
    main()
