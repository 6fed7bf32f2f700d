"""Run observability: per-step ``metrics.jsonl``, TensorBoard scalars, MFU, progress lines, a loss plot.

MFU is model FLOPs per second (`train.flops`: matmuls plus causal attention, remat not counted)
over the summed peak of the devices in use. Peaks are dense bf16 tensor-core / MXU numbers from
the vendors' data sheets (no structured sparsity); a run in fp32 is still measured against them,
as is usual when quoting MFU. The CPU entry is a nominal figure, stated here rather than measured:
one x86 core with two AVX2 FMA units at ~3 GHz does 2 × 8 fp32 lanes × 2 FLOPs × 3e9 ≈ 96 GFLOP/s,
so a host counts as ``cores × 0.1`` TFLOP/s, shared by all the emulated devices on it.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any

import jax

from convert.atomic import atomic_file, atomic_path

# Dense bf16 peak TFLOP/s per device, matched against `jax.Device.device_kind` (first match wins).
DEVICE_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("h200", 989.4),
    ("h100", 989.4),  # SXM; the PCIe card is 756
    ("a100", 312.0),
    ("tpu v6", 918.0),  # v6e ("TPU v6 lite")
    ("tpu v5 lite", 197.0),  # v5e
    ("tpu v5e", 197.0),
    ("tpu v5p", 459.0),
    ("tpu v5", 459.0),  # v5p reports "TPU v5"
    ("tpu v4", 275.0),
)
CPU_TFLOPS_PER_CORE = 0.1  # nominal, see the module docstring


def device_peak_tflops(device: jax.Device | None = None) -> tuple[float, str]:
    """Peak TFLOP/s of one device and where the number comes from.

    On CPU the host's nominal peak (`CPU_TFLOPS_PER_CORE` × cores) is divided among the
    emulated devices of this process, since they share those cores.
    """
    device = device or jax.devices()[0]
    kind = str(getattr(device, "device_kind", device.platform)).lower()
    if device.platform == "cpu":
        cores = os.cpu_count() or 1
        per_device = CPU_TFLOPS_PER_CORE * cores / max(jax.local_device_count(), 1)
        return per_device, f"cpu nominal {CPU_TFLOPS_PER_CORE * cores:.2f} TFLOP/s per host ({cores} cores)"
    for key, peak in DEVICE_PEAK_TFLOPS:
        if key in kind:
            return peak, f"{kind}: {peak} TFLOP/s (bf16 dense)"
    return float("nan"), f"{kind}: unknown peak (set peak_tflops in the config)"


def mfu(flops_per_step: float, seconds: float, num_devices: int, peak_tflops_per_device: float) -> float:
    """Model FLOPs utilisation of one step: achieved FLOP/s over the devices' summed peak."""
    if seconds <= 0 or not peak_tflops_per_device > 0:
        return float("nan")
    return flops_per_step / seconds / (num_devices * peak_tflops_per_device * 1e12)


class MetricsLogger:
    """Writes one JSON line per step (process 0 only), mirrors scalars to TensorBoard, plots at the end.

    Args:
        run_dir: the run directory (``metrics.jsonl``, ``tb/``, ``loss.png`` go there).
        resume_step: when resuming, lines for global steps after this one are dropped first (they
            belong to the interrupted attempt and are about to be recomputed).
        tensorboard: write TensorBoard scalars when ``tensorboardX`` is importable.
        enabled: False on processes other than 0.
    """

    def __init__(self, run_dir: str, *, resume_step: int | None = None, tensorboard: bool = True, enabled: bool = True):
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:  # optional: pip install 'ringllama[tensorboard]'
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(os.path.join(run_dir, "tb"))

    def _truncate_after(self, step: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", -1) <= step]
        with atomic_file(self.path) as fh:
            fh.writelines(json.dumps(r) + "\n" for r in kept)

    def log(self, record: dict[str, Any]) -> None:
        """Append one record (a dict of JSON scalars; ``step`` is the global step)."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
                    self._tb.add_scalar(f"{record.get('kind', 'train')}/{k}", v, record.get("step", 0))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl``."""
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


class StepTimer:
    """Wall time between consecutive `tick` calls (the first interval includes compilation)."""

    def __init__(self) -> None:
        self._last = time.perf_counter()

    def tick(self) -> float:
        now = time.perf_counter()
        dt, self._last = now - self._last, now
        return dt


class LineProgress:
    """Progress for logs (stdout not a terminal): one line per ~10% of the steps or every ``seconds``.

    A 10% line closer than ``gap`` seconds to the previous line is skipped (a fast stage logs less).

    Same ``update`` / ``set_postfix`` / ``close`` calls as a tqdm bar, so the runner uses either.
    """

    def __init__(
        self, total: int, initial: int, name: str, say=print, seconds: float = 60.0, parts: int = 10, gap: float = 5.0
    ):
        self.total, self.n, self.name, self.say, self.seconds, self.gap = total, initial, name, say, seconds, gap
        self._every = max(1, -(-total // parts))
        self._postfix = ""
        self._t0 = self._last = time.perf_counter()
        self._start = initial

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        now = time.perf_counter()
        crossed = before // self._every != self.n // self._every
        quiet = now - self._last  # a boundary within `gap` seconds of the last line would only repeat it
        if (crossed and quiet >= self.gap) or self.n == self.total or quiet >= self.seconds:
            self._last = now
            done = self.n - self._start
            rate = done / max(now - self._t0, 1e-9)
            eta = (self.total - self.n) / rate if rate > 0 else float("nan")
            pct = 100 * self.n / max(self.total, 1)
            self.say(f"{self.name}: step {self.n}/{self.total} ({pct:.0f}%), {rate:.2f} steps/s, "
                     f"eta {eta:.0f} s{self._postfix}")  # fmt: skip

    def set_postfix(self, **values) -> None:
        self._postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        pass


def plot_run(metrics_path: str, out_png: str) -> str | None:
    """Loss (per step, with stage boundaries) and held-out perplexity per stage; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    records = read_metrics(metrics_path)
    train = [r for r in records if r.get("kind", "train") == "train" and isinstance(r.get("loss"), float)]
    evals = [r for r in records if r.get("kind") == "eval" and isinstance(r.get("perplexity"), float)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1)
    seen = set()
    for r in train:
        if r["stage"] not in seen:
            seen.add(r["stage"])
            ax1.axvline(r["step"], color="grey", ls=":", lw=1)
            ax1.text(r["step"], ax1.get_ylim()[1] if train else 0, f" {r['stage']}", va="top", fontsize=8)
    ax1.set(xlabel="step", ylabel="train loss (weighted)", title="training loss", yscale="log")
    for length in sorted({r["seq_len"] for r in evals}):
        pts = [r for r in evals if r["seq_len"] == length]
        ax2.plot([r["step"] for r in pts], [r["perplexity"] for r in pts], "o-", label=f"{length} tokens")
    ax2.set(xlabel="step", ylabel="held-out perplexity", title="perplexity at stage ends", yscale="log")
    if evals:
        ax2.legend()
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
    return out_png
