"""Peak memory of loading a cache file, against the file's size (docs/file-format.md).

Writes a 16-bit cache of 200,000 tokens x 8 heads x 64 numbers (about 820 MB) to a temporary
folder, then reads it in a fresh process and prints how much that process grew while reading:

    python benchmarks/load_memory.py
"""

import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

READ = """
import sys
from nexusquant_cache import io
def peak():  # VmHWM: this process's peak resident set (ru_maxrss may carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) * 1024
before = peak()
io.read(sys.argv[1])
print(peak() - before)
"""


def main() -> None:
    import torch

    from nexusquant_cache import NexusQuantCache, NexusQuantConfig

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "big.nqc"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no model: nothing to check here
            cache = NexusQuantCache(NexusQuantConfig(key_bits=16, value_bits=16))
        states = torch.randn(1, 8, 200_000, 64)
        cache.update(states, states, 0)
        cache.save(path)
        del cache, states
        grown = int(
            subprocess.run([sys.executable, "-c", READ, str(path)], capture_output=True, text=True, check=True).stdout
        )
        size = path.stat().st_size
        print(f"file {size / 1e6:.0f} MB; reading it grew the process by {grown / 1e6:.0f} MB ({grown / size:.2f}x)")


if __name__ == "__main__":
    main()
