"""ONNX Runtime's spinning threads and the engine timed after them, in one process.

    python scripts/ort_spinning.py [--batch-sizes 1,8] [--rounds 11] [--threads 2]

Swin-T (random weights) exported once; per round each ONNX Runtime session variant runs, then swinkit's
PyTorch fast path right after it: `spin` (ORT's default: workers go on spinning after a run), `spin+stop`
(`session.force_spinning_stop`, what `infer.onnx_runner.session_options` sets) and `nospin`
(`session.intra_op.allow_spinning=0`). Prints the median of each session and of the fast path after it.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import swinkit
from swinkit.infer.export import export_onnx
from swinkit.infer.onnx_runner import session_options

VARIANTS = {"spin": {"session.force_spinning_stop": "0"}, "spin+stop": {},
            "nospin": {"session.force_spinning_stop": "0", "session.intra_op.allow_spinning": "0"}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import onnxruntime as ort
    ort.set_default_logger_severity(3)  # not the notice that a variant overwrites swinkit's entry
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = swinkit.create_model("swin_tiny_patch4_window7_224").eval()
    fast = swinkit.optimize_for_inference(model)
    with tempfile.TemporaryDirectory() as folder:
        path = export_onnx(model, Path(folder) / "swin_t.onnx")
        sessions = {}
        for name, entries in VARIANTS.items():
            options = session_options(args.threads)  # swinkit's options, then the variant's entries over them
            for key, value in entries.items():
                options.add_session_config_entry(key, value)
            sessions[name] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for batch in (int(b) for b in args.batch_sizes.split(",")):
            images = torch.randn(batch, 3, 224, 224)
            feed = {sessions["spin"].get_inputs()[0].name: images.numpy()}
            ort_s = {name: [] for name in sessions}
            after = {name: [] for name in sessions}
            with torch.inference_mode():
                fast(images)
                for session in sessions.values():
                    session.run(None, feed)
                for _ in range(args.rounds):
                    for name, session in sessions.items():
                        start = time.perf_counter()
                        session.run(None, feed)
                        ort_s[name].append(time.perf_counter() - start)
                        start = time.perf_counter()
                        fast(images)
                        after[name].append(time.perf_counter() - start)
            for name in sessions:
                print(f"batch {batch} {name:9s}: ONNX Runtime {1e3 * statistics.median(ort_s[name]):7.1f} ms, "
                      f"swinkit's fast path right after it {1e3 * statistics.median(after[name]):7.1f} ms")


if __name__ == "__main__":
    main()
