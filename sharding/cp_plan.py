"""Which context-parallel strategy? Memory, bytes sent and time per layer for each, and a pick.

Symbols (shape letters as in the `attention` legend): N devices on the ``sequence`` axis, T tokens
per sequence, t = T/N per device, B sequences per device, n / k query / kv heads per device (after
``tensor``), h head_dim, e bytes per activation element, U the Ulysses group, k' the kv heads
Ulysses needs (`attention.ulysses_heads`: k replicated as far as whole GQA groups per device need).
F is the attention kernel's achieved FLOP/s; links are one direction of one link, "fast" inside a
node (NVLink; TPU ICI) and "slow" across nodes (InfiniBand; on TPU every link is ICI).

Every strategy computes the same pairs (causal skipping included): forward ``2·B·t·T·n·h`` FLOPs
causal (4·… full), backward 2.5× that, plus the forward again under full remat. They differ in
the size of each kernel call: a ring hop attends t queries to t keys, all-gather and Ulysses make
one call over all T keys, a hybrid hop U·t. Flash kernels lose efficiency on short key blocks
(loop and launch overheads, pipeline fill, the hop's wait for its slowest device), modelled as
``η(L) = L / (L + L½)`` of the kernel rate for L keys per call, with ``L½ = 2048``: an assumption
that reproduces MaxText's measured 28.5% (ring) against 52.9% (all-gather) MFU at 32K on cp=16
(t = 2K: η = 0.50 against 0.94, ratio 1.88 for their 1.86). What else differs:

=========  ===============================================  ==========================================
strategy   bytes sent per device and layer (fwd + bwd)       extra memory per device (peak, one layer)
=========  ===============================================  ==========================================
ring       (N−1)·B·t·(2kh·e + 8) forward; again + the        two K/V blocks in flight, two fp32 dK/dV
           fp32 dK/dV accumulator (N sends) backward;        blocks: B·t·2kh·(2e + 8)
           hidden behind each hop's compute when it is
           compute-bound (`sharding.comm`)
allgather  (N−1)·B·t·(2kh·e + 8) gather, twice (fwd, bwd),   one layer's full K/V and fp32 dK/dV:
           + (N−1)·B·t·2kh·4 reduce-scatter; exposed         B·T·2kh·(e + 4)
ulysses    (U−1)/U·B·t·h·e·(2n + 2k') forward (q, k, v,      the all-to-all buffers, in and out:
           out), the same backward (dO, dq, dk, dv);         2·B·t·h·e·(2n + 2k')
           exposed
hybrid     Ulysses inside groups of U (fast links) + a ring  Ulysses' buffers + the ring's, its blocks
           of N/U hops across them (slow links)              U·t tokens of k'/U heads
=========  ===============================================  ==========================================

A ring over more devices than a node holds crosses the slow links on every hop (some neighbour
pair always does); all-gather and all-to-all over a group are paced by its slowest link.

`recommend` picks the fastest feasible strategy whose extra memory fits the headroom (when the
device memory is known), and prefers less memory when times are within 2%: on a CPU mesh, where
communication is free, that is the ring. The numbers are a model (rates from `sharding.comm`),
not a measurement; `python -m sharding compile` checks the memory with the real compiler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attention import STRATEGIES, AttentionError, ulysses_heads
from attention.strategies import default_ulysses_size
from sharding.comm import BACKWARD_FLOP_RATIO, KERNEL_TFLOPS, LINK_GBYTES

MEMORY_ORDER = ("ring", "hybrid", "ulysses", "allgather")  # least extra memory first
HALF_EFFICIENCY_KEYS = 2048  # L½ of the kernel efficiency model (module docstring)


def kernel_efficiency(keys: int, half: int = HALF_EFFICIENCY_KEYS) -> float:
    """η(L): the fraction of the kernel rate a call over ``keys`` keys reaches (module docstring)."""
    return keys / (keys + half)


@dataclass(frozen=True)
class Links:
    """A device type's kernel rate and links: fast inside a node of ``node_size`` devices, slow across."""

    kernel_tflops: float
    fast_gbytes: float
    slow_gbytes: float
    node_size: int
    half_efficiency_keys: int = 2048


# GPUs: 8 per node on NVLink, one InfiniBand NIC per GPU across nodes; TPU: ICI between all chips.
LINKS = {
    "h100": Links(KERNEL_TFLOPS["h100"], LINK_GBYTES["nvlink4"], LINK_GBYTES["ib-ndr"], 8),
    "h200": Links(KERNEL_TFLOPS["h200"], LINK_GBYTES["nvlink4"], LINK_GBYTES["ib-ndr"], 8),
    "a100": Links(KERNEL_TFLOPS["a100"], LINK_GBYTES["nvlink3"], LINK_GBYTES["ib-hdr"], 8),
    "tpu-v5p": Links(KERNEL_TFLOPS["tpu-v5p"], LINK_GBYTES["ici-v5p"], LINK_GBYTES["ici-v5p"], 1 << 30),
    "tpu-v5e": Links(KERNEL_TFLOPS["tpu-v5e"], LINK_GBYTES["ici-v5e"], LINK_GBYTES["ici-v5e"], 1 << 30),
    # The emulated CPU mesh: "links" are memory copies, far faster than its attention FLOP/s, and
    # the jnp chunk loops run at the same rate on a hop's block as on the whole sequence.
    "cpu": Links(0.05, 10.0, 10.0, 1 << 30, half_efficiency_keys=0),
}


@dataclass(frozen=True)
class StrategyPlan:
    """One strategy's cost per device and layer (bytes, seconds); ``why_not`` set when infeasible."""

    strategy: str
    why_not: str = ""
    working_bytes: int = 0
    kv_bytes: int = 0
    a2a_bytes: int = 0
    sent_bytes: int = 0
    compute_s: float = 0.0
    comm_s: float = 0.0
    exposed_s: float = 0.0
    ulysses_size: int = 1

    @property
    def feasible(self) -> bool:
        return not self.why_not

    @property
    def extra_bytes(self) -> int:
        return self.kv_bytes + self.a2a_bytes

    @property
    def layer_s(self) -> float:
        return self.compute_s + self.exposed_s


def _ring_time(hops: int, fwd_s: float, bwd_s: float, fwd_bytes: float, bwd_bytes: float, gbytes: float):
    """(comm, exposed) seconds of a ring of ``hops``: each hop hides its transfer behind its compute."""
    if hops <= 1:
        return 0.0, 0.0
    bw = gbytes * 1e9
    per_f, per_b = fwd_s / hops, bwd_s / hops
    comm = (hops - 1) * (fwd_bytes + bwd_bytes) / bw + bwd_bytes / bw  # + the dK/dV return home
    exposed = (hops - 1) * (max(0.0, fwd_bytes / bw - per_f) + max(0.0, bwd_bytes / bw - per_b)) + bwd_bytes / bw
    return comm, exposed


def plan_strategies(
    *,
    seq_len: int,
    batch_per_device: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    devices: int,
    links: Links,
    elem_bytes: int = 2,
    causal: bool = True,
    remat: bool = True,
    ulysses_size: int | None = None,
) -> list[StrategyPlan]:
    """Every strategy's `StrategyPlan` (heads per device, i.e. after ``tensor``)."""
    n_dev, t, b, h, e = devices, seq_len // devices, batch_per_device, head_dim, elem_bytes
    fwd_flops = (2.0 if causal else 4.0) * b * t * seq_len * heads * h

    def times(keys: int) -> tuple[float, float]:
        fwd = fwd_flops / (links.kernel_tflops * 1e12 * kernel_efficiency(keys, links.half_efficiency_keys))
        return fwd, BACKWARD_FLOP_RATIO * fwd + (fwd if remat else 0.0)

    fwd_s, bwd_s = times(t)
    working = b * t * heads * h * (2 * e + 8) + b * t * heads * 8
    block = b * t * (2 * kv_heads * h * e + 8)  # K, V and int32 positions, segment ids
    dkv = b * t * 2 * kv_heads * h * 4
    fast, slow = links.fast_gbytes, links.slow_gbytes
    ring_link = fast if n_dev <= links.node_size else slow
    plans = []

    comm, exposed = _ring_time(n_dev, fwd_s, bwd_s, block, block + dkv, ring_link)
    plans.append(StrategyPlan("ring", "", working, 2 * block + 2 * dkv, 0, int((n_dev - 1) * (2 * block + dkv) + dkv),
                              fwd_s + bwd_s, comm, exposed))  # fmt: skip
    compute = sum(times(seq_len))

    gather = (n_dev - 1) * (2 * block + dkv)
    g_s = gather / (ring_link * 1e9)
    full_kv = b * seq_len * 2 * kv_heads * h * (e + 4) + b * seq_len * 8
    plans.append(StrategyPlan("allgather", "", working, full_kv, 0, int(gather), compute, g_s, g_s))

    def ulysses(name: str, group: int) -> StrategyPlan:
        try:
            kv = ulysses_heads(heads, kv_heads, group)
        except AttentionError as exc:
            return StrategyPlan(name, str(exc), ulysses_size=group)
        moved = b * t * h * e * (2 * heads + 2 * kv) + b * t * 16
        a2a = 2 * (group - 1) / group * moved  # forward and backward
        a2a_link = fast if group <= links.node_size else slow
        a2a_s = a2a / (a2a_link * 1e9)
        rings = n_dev // group
        r_block = b * t * (2 * kv * h * e + 8 * group)
        r_dkv = b * t * 2 * kv * h * 4
        r_link = fast if n_dev <= links.node_size else slow
        g_fwd, g_bwd = times(group * t if rings > 1 else seq_len)
        r_comm, r_exposed = _ring_time(rings, g_fwd, g_bwd, r_block, r_block + r_dkv, r_link)
        r_mem = 2 * r_block + 2 * r_dkv if rings > 1 else b * t * 2 * kv * h * e
        sent = a2a + (rings - 1) * (2 * r_block + r_dkv) + (r_dkv if rings > 1 else 0)
        return StrategyPlan(name, "", working, r_mem, int(2 * moved), int(sent), g_fwd + g_bwd, a2a_s + r_comm,
                            a2a_s + r_exposed, group)  # fmt: skip

    plans.append(ulysses("ulysses", n_dev))
    group = ulysses_size or default_ulysses_size(n_dev, heads, min(links.node_size, 8))
    if n_dev % group or group in (1, n_dev):
        why = f"hybrid needs a Ulysses group that divides the {n_dev} devices and is neither 1 nor {n_dev}"
        plans.append(StrategyPlan("hybrid", why + f" (got {group}).", ulysses_size=group))
    else:
        plans.append(ulysses("hybrid", group))
    return plans


def recommend(plans: list[StrategyPlan], headroom_bytes: int | None = None) -> tuple[str, str]:
    """``(strategy, reason)``: the fastest feasible plan whose extra memory fits ``headroom_bytes``."""
    fits = [p for p in plans if p.feasible and (headroom_bytes is None or p.extra_bytes <= headroom_bytes)]
    if not fits:
        return "ring", "no strategy's buffers fit the memory left; the ring needs the least (O(T/N))"
    best = min(p.layer_s for p in fits)
    near = [p for p in fits if p.layer_s <= best * 1.02]
    pick = min(near, key=lambda p: MEMORY_ORDER.index(p.strategy))
    ring = next(p for p in plans if p.strategy == "ring")
    if pick.strategy == "ring":
        why = "communication hidden behind compute: " if ring.exposed_s <= 0.02 * ring.compute_s else ""
        return "ring", why + "fastest or within 2% of it, with the least memory (O(T/N))"
    gain = ring.layer_s / pick.layer_s if pick.layer_s else math.inf
    dropped = [p.strategy for p in plans if p.feasible and p not in fits]
    note = f"; {', '.join(dropped)} would not fit the memory left" if dropped else ""
    return pick.strategy, (
        f"{gain:.2f}× the ring's speed per layer ({pick.layer_s * 1e3:.2f} ms vs {ring.layer_s * 1e3:.2f} ms: the "
        f"ring exposes {ring.exposed_s * 1e3:.2f} ms of transfer), {pick.extra_bytes / 2**30:.2f} GiB of buffers{note}"
    )


def model_strategies(cfg, seq_len: int, batch: int, sizes: dict[str, int], links: Links, remat: bool = True):
    """`plan_strategies` for a `model.LlamaConfig` on a resolved mesh ``{axis: size}``."""
    n_dev = sizes.get("sequence", 1)
    tensor = sizes.get("tensor", 1)
    split = tensor if cfg.num_heads % tensor == 0 and cfg.num_kv_heads % tensor == 0 else 1
    return plan_strategies(
        seq_len=seq_len,
        batch_per_device=max(1, batch // (sizes.get("data", 1) * sizes.get("fsdp", 1))),
        heads=cfg.num_heads // split,
        kv_heads=cfg.num_kv_heads // split,
        head_dim=cfg.head_dim,
        devices=n_dev,
        links=links,
        elem_bytes=2 if cfg.dtype in ("bfloat16", "float16") else 4,
        remat=remat,
        ulysses_size=cfg.ulysses_size or None,
    )


def strategy_table(plans: list[StrategyPlan], choice: tuple[str, str]) -> str:
    """The per-strategy table ``python -m sharding plan`` prints, and the recommendation."""
    gib = lambda x: f"{x / 2**30:.2f}"  # noqa: E731
    lines = [
        "context parallelism, per device and layer (forward + backward):",
        f"{'strategy':<11}{'working GiB':>12}{'K/V GiB':>9}{'a2a GiB':>9}{'sent MB':>10}{'comm ms':>9}"
        f"{'compute ms':>12}{'exposed ms':>12}",
    ]
    for p in plans:
        name = p.strategy + (f" ({p.ulysses_size})" if p.strategy == "hybrid" else "")
        if not p.feasible:
            lines.append(f"{name:<11}  not possible: {p.why_not}")
            continue
        lines.append(
            f"{name:<11}{gib(p.working_bytes):>12}{gib(p.kv_bytes):>9}{gib(p.a2a_bytes):>9}{p.sent_bytes / 1e6:>10.1f}"
            f"{p.comm_s * 1e3:>9.2f}{p.compute_s * 1e3:>12.2f}{p.exposed_s * 1e3:>12.2f}"
        )
    lines.append(f"recommended: {choice[0]} — {choice[1]}")
    return "\n".join(lines)


# jax ``device_kind`` substrings → `LINKS` keys (the first match wins).
DEVICE_KINDS = (("h200", "h200"), ("h100", "h100"), ("a100", "a100"), ("v5p", "tpu-v5p"), ("v5 lite", "tpu-v5e"),
                ("v5e", "tpu-v5e"), ("cpu", "cpu"))  # fmt: skip


def device_links(device) -> Links:
    """The `Links` of a jax device, by its kind (an unknown GPU or TPU: the H100 / v5p rates)."""
    kind = f"{getattr(device, 'device_kind', '')} {getattr(device, 'platform', '')}".lower()
    for needle, key in DEVICE_KINDS:
        if needle in kind:
            return LINKS[key]
    return LINKS["tpu-v5p" if "tpu" in kind else "h100"]


def resolve_context_parallel(cfg, seq_len: int, batch: int, mesh, remat: bool | None = None, links=None):
    """``(cfg, reason)``: ``context_parallel: auto`` replaced by `recommend`'s pick for this mesh.

    A training run calls this per stage, so ``auto`` means the planner's choice for the stage's
    length, batch, mesh and device type (``links``, default: the mesh's first device's). Other
    values pass through.
    """
    sizes = dict(mesh.shape)
    if cfg.context_parallel != "auto" or sizes.get("sequence", 1) <= 1:
        return cfg, ""
    remat = cfg.remat_policy != "none" if remat is None else remat
    links = device_links(mesh.devices.flat[0]) if links is None else links
    plans = model_strategies(cfg, seq_len, batch, sizes, links, remat=remat)
    choice, why = recommend(plans)
    return cfg.replace(context_parallel=choice), why


__all__ = [
    "LINKS",
    "STRATEGIES",
    "Links",
    "StrategyPlan",
    "device_links",
    "model_strategies",
    "plan_strategies",
    "recommend",
    "resolve_context_parallel",
    "strategy_table",
]
