"""On-device benchmark of an exported bundle: 1-thread p50/p95 latency (query encoding, head on 100 candidates,
end to end) for ONNX Runtime and LiteRT against torch fp32 eager in the same run, bundle sizes, and each runtime
process's peak memory. The logic lives in ``export/bench.py``; this is the script entry point.

    python benchmarks/ondevice.py --bundle bundles/default [--checkpoint runs/x/head.pt] [--iters 200]
    fedrank bench ondevice --bundle bundles/default            (the same)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.bench import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
