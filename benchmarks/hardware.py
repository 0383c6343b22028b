"""Hardware bound: this machine's matmul throughput with torch, and the fraction of it a pass achieves.

Throughput is the best of a few square matmuls (sizes 1024-4096) timed after a warm-up, in
the dtype asked (fp32 by default; on a GPU also the model's own dtype, since the signal pass
runs in bf16 there). Model FLOPs follow the usual estimate: a forward pass costs about
2 x parameters x tokens (attention's own N^2 term is small at these lengths and is left out).
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import log


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_flops(
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    sizes: tuple[int, ...] = (1024, 2048, 4096),
    min_seconds: float = 1.0,
) -> dict:
    """Best achieved FLOP/s of ``a @ b`` over ``sizes`` (each timed for at least ``min_seconds``)."""
    device = torch.device(device)
    if device.type == "cuda" and dtype == torch.float32:
        # "fp32 throughput": no TF32 shortcut
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        prev = None
    per_size = {}
    try:
        for n in sizes:
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            for _ in range(2):
                a @ b
            _sync(device)
            reps, t0 = 0, time.perf_counter()
            while True:
                a @ b
                reps += 1
                if reps % 4 == 0 or device.type != "cuda":
                    _sync(device)
                    if time.perf_counter() - t0 >= min_seconds:
                        break
            _sync(device)
            dt = time.perf_counter() - t0
            per_size[n] = 2.0 * n**3 * reps / dt
            del a, b
    finally:
        if prev is not None:
            torch.backends.cuda.matmul.allow_tf32 = prev
    best = max(per_size.values())
    return {
        "flops": best,
        "gflops": best / 1e9,
        "per_size_gflops": {str(k): v / 1e9 for k, v in per_size.items()},
        "dtype": str(dtype).replace("torch.", ""),
        "device": str(device),
        "threads": torch.get_num_threads(),
    }


def run(settings, models) -> dict:
    lm = models.get()
    device = lm.device
    model_dtype = next(lm.model.parameters()).dtype
    log(f"hardware: timing {str(model_dtype)} / fp32 matmuls on {device}")
    out = {"fp32": matmul_flops(device, torch.float32, min_seconds=1.0 if device.type == "cpu" else 0.5)}
    if model_dtype != torch.float32:
        out[str(model_dtype).replace("torch.", "")] = matmul_flops(device, model_dtype, min_seconds=0.5)
    out["model_dtype"] = str(model_dtype).replace("torch.", "")
    out["peak_for_model_dtype_flops"] = out.get(out["model_dtype"], out["fp32"])["flops"]
    log(f"hardware: fp32 {out['fp32']['gflops']:.1f} GFLOP/s with {out['fp32']['threads']} threads")
    return out


def model_flops(n_params: int, n_tokens: int) -> float:
    """Forward-pass FLOPs by the 2 x parameters x tokens estimate."""
    return 2.0 * float(n_params) * float(n_tokens)
