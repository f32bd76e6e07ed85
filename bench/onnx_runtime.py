"""Figure 6: the assembled model under ONNX Runtime vs eager torch.

The branches-form model of figure 3 (three plain_cnn components, CIFAR-10 spec) is
exported as the service exports it: `.pt` (lego_core.export_model), then ONNX
(lego_core.onnx_export.export_onnx, what `GET /assemblies/{id}/download?format=onnx`
answers). Baseline: the `.pt` loaded with lego_core.load_exported, as predict runs it
(eager torch on the ExportedProgram's module). Project: an ONNX Runtime session on the
CPU with as many intra-op threads as torch has in this run (`--threads`). Latency per
call at batch 1 and at batch 64, the two interleaved round by round; the ratio is
torch time / ONNX Runtime time (above 1: ONNX Runtime is faster). No goal: reported.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import Config, FigureResult, Row, alternate, median, paired_ratio, spread, timed


def run(cfg: Config) -> FigureResult:
    import onnxruntime as ort

    from bench.assembly import build
    from lego_core import export_model, load_exported
    from lego_core.onnx_export import export_onnx

    res = FigureResult()
    cfg.log("[6] locating and assembling three plain_cnn components; exporting .pt and ONNX")
    forms, _ = build("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        pt, onnx_path = Path(tmp) / "a.pt", Path(tmp) / "a.onnx"
        export_model(forms["branches"], pt)
        export_onnx(pt, onnx_path)
        eager = load_exported(pt)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        onnx_bytes = onnx_path.stat().st_size

    shape = eager.spec.shape
    x8 = torch.rand(8, *shape)
    diff = float(
        np.abs(session.run(["logits"], {"images": x8.numpy()})[0] - eager(x8).numpy()).max()
    )
    lat: dict[int, dict[str, list[float]]] = {}
    for batch in (1, 64):
        xb = torch.rand(batch, *shape)
        xn = xb.numpy()
        calls = 20 if batch == 1 else 2

        def torch_case(xb=xb, calls=calls) -> float:
            def go():
                for _ in range(calls):
                    eager(xb)

            return timed(go) / calls

        def ort_case(xn=xn, calls=calls) -> float:
            def go():
                for _ in range(calls):
                    session.run(["logits"], {"images": xn})

            return timed(go) / calls

        cfg.log(f"[6] latency at batch {batch}, {cfg.fig3_reps} rounds")
        lat[batch] = alternate({"torch": torch_case, "onnxruntime": ort_case}, cfg.fig3_reps)
        r = paired_ratio(lat[batch]["torch"], lat[batch]["onnxruntime"])
        res.rows.append(
            Row(
                "6",
                f"assembled (3 plain_cnn, branches): latency at batch {batch}, "
                "ONNX Runtime vs eager torch (.pt)",
                unit="s",
                project=median(lat[batch]["onnxruntime"]),
                baseline=median(lat[batch]["torch"]),
                ratio=r,
                ratio_text=f"{r:.2f}x faster" if r >= 1 else f"{1 / r:.2f}x slower",
                goal="report",
                met=None,
                data={k: spread(v) for k, v in lat[batch].items()},
            )
        )
    res.notes.append(
        f"ONNX Runtime {ort.__version__}, CPUExecutionProvider, {torch.get_num_threads()} "
        f"intra-op thread(s) like torch; the ONNX file is {onnx_bytes / 1024:.0f} KiB; largest "
        f"logit difference to the .pt on 8 random images: {diff:.1e} (the test bound is 1e-4)."
    )
    return res
