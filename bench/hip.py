"""HiP attention benchmark: mask estimation + sparse attention vs dense causal attention.

    python bench/hip.py [--quick] [--out DIR] [--device auto|cuda|cpu] [--budget SECONDS]

GPU (when CUDA is available), bf16, B=1, H=32, H_kv=8, D=128, the API defaults (topk 512,
block_size_q 64, block_size_k 2, query_stride 2, sink_tokens 16, window 256):

* prefill at T = 32k, 64k, 128k (--quick: 32k and 128k): mask estimation (``subquad.hip_mask``),
  attention with that mask (``kernels.hip.hip_sparse_attention``) and the two together
  (``subquad.hip_attention``), timed separately, vs SDPA causal on the flash backend (grouped-query
  K/V through ``enable_gqa``, or expanded outside the timing where that backend refuses it);
  full mode also times attention forward+backward (mask held fixed) against SDPA's;
* decoding one token at Tk = 128k and 512k: attention with a reused mask, and with a fresh mask
  (estimation + attention), vs SDPA on the same cache (the query heads of a KV group stacked as
  queries of one [B, H_kv, GROUP, D] problem, flash-decoding's GQA trick: no K/V copy);
* hip-attn on the same inputs when it is importable (it is not installed where this was written,
  and its API is not wired here: the row says so);
* attention-mass capture: the fraction of the true causal softmax mass (over every visible key)
  that the selected blocks + sinks + local region hold, averaged over queries and heads, on
  Gaussian queries and keys and on locally correlated ones (AR(1) along the sequence, rho 0.98), with queries
  scaled so logits have a standard deviation of 3 (peaked attention, as in trained models; at
  std 1 attention is near uniform and capture only measures coverage). Computed on the GPU in
  chunks of query rows at T = 16k (--quick: 8k), H = 8, next to the fraction of causal keys
  the mask covers (capture of uniform attention).

Targets (issue 4): prefill at 128k end to end >= 4x faster than SDPA causal; a decoding step at
128k with a reused mask >= 8x faster than SDPA decoding; memory O(T).

CPU: the reference path (``subquad.hip_attention`` on CPU tensors: the literal tree search and the
gathered attention) at T = 8k and 16k (--quick: 4k with one timed call, ~1-2 minutes in all),
fp32, B=1, H=4, H_kv=2, D=64, estimation and attention timed separately and together, vs SDPA
causal on CPU; each case in a fresh process (``bench.common.cpu_case``). Capture fractions on CPU: T = 2048, H = 2, topk 128, window 64.

Writes ``hip_<cuda|cpu>.json`` / ``.md`` / ``.png`` to --out; --quick writes one
``hip_<cuda|cpu>.md`` with the JSON at its end. ``check()`` (run by ``python -m bench``): the
Triton kernels vs the float64 definition on selections made by ``subquad.hip_mask``.

FLOP / byte floors (per layer call, useful work): dense causal attention 2 B H D T^2 FLOPs forward
(QK^T and PV over T^2 / 2 pairs); HiP attention 4 B H D sum_i n_i with n_i <= sink_tokens + topk
+ window + block_size_q keys per query (<= 848 with the defaults): at 128k, 4 x 32 x 128 x 131072 x
848 = 1.8 TFLOP against 2 x 32 x 128 x 131072^2 = 141 TFLOP dense (77x); mask estimation adds
about 2 B H D (T / query_stride) (2 topk) log2(T / topk) FLOPs (A's kernel documents its own
count). K/V bytes read by the attention kernel: per
query tile 2 D n_i x 2 B (bf16), sinks/window shared by the 4 heads of a KV group through L2.
Decoding at Tk: HiP reads 2 x 8 x 848 x 128 x 2 B = 3.5 MB of K/V, SDPA 2 x 8 x Tk x 128 x 2 B
(537 MB at 128k): the floor ratio is ~150x at 128k, before launch latency.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from typing import List, Optional

if __package__ in (None, ""):  # run as a script: make `bench` importable from the repo root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from bench import common
from bench.common import fmt, ratio

NAME = "hip"
PARAMS = dict(topk=512, block_size_q=64, block_size_k=2, query_stride=2, sink_tokens=16, window=256)
GPU_SHAPE = dict(B=1, H=32, Hkv=8, D=128)
PREFILL_T = [32768, 65536, 131072]
PREFILL_T_QUICK = [32768, 131072]
DECODE_TK = [131072, 524288]
TARGET_T = 131072
MASS_SHAPE_GPU = dict(T=16384, T_quick=8192, H=8, Hkv=2, D=128)
MASS_SHAPE_CPU = dict(T=2048, T_quick=2048, H=2, Hkv=1, D=64)
MASS_PARAMS_CPU = dict(PARAMS, topk=128, window=64)
LOGIT_STD = 3.0
AR_RHO = 0.98

CPU_SHAPE = dict(B=1, H=4, Hkv=2, D=64)
CPU_T = [8192, 16384]
CPU_T_QUICK = [4096]


def _geo(p: dict) -> dict:
    return dict(block_size_q=p["block_size_q"], block_size_k=p["block_size_k"], sink_tokens=p["sink_tokens"],
                window=p["window"])


def hip_attn_module():
    """hip-attn (the authors' package) when importable, else None. Not wired: see the module doc."""
    if importlib.util.find_spec("hip_attn") is None:
        return None
    try:
        import hip_attn
    except Exception:
        return None
    return hip_attn


# ----------------------------------------------------------------------------------------------
# inputs and the implementations compared


def make_qkv(B, T, H, Hkv, D, dtype, device, seed=0, Tq=None, kind="gaussian"):
    """q [B, Tq, H, D], k, v [B, T, H_kv, D]: random normal (kind "gaussian"), or queries and keys
    following AR(1) processes along the sequence (kind "local": x_t = rho x_{t-1} + sqrt(1 - rho^2)
    e_t, unit variance; neighbouring queries want neighbouring keys, as in trained models)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    Tq = T if Tq is None else Tq
    q = torch.randn(B, Tq, H, D, generator=gen, device=device, dtype=torch.float32)
    k = torch.randn(B, T, Hkv, D, generator=gen, device=device, dtype=torch.float32)
    v = torch.randn(B, T, Hkv, D, generator=gen, device=device, dtype=torch.float32)
    if kind == "local":
        q, k = _ar1(q), _ar1(k)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _ar1(e):
    """x_t = rho x_{t-1} + sqrt(1 - rho^2) e_t along dim 1 (a Python loop over t: only used at the
    capture benchmark's sizes, <= 16k steps)."""
    x = torch.empty_like(e)
    x[:, 0] = e[:, 0]
    c = math.sqrt(1 - AR_RHO ** 2)
    for t in range(1, e.shape[1]):
        x[:, t] = AR_RHO * x[:, t - 1] + c * e[:, t]
    return x


def _sdpa_layout(q, k, v):
    """[B, T, H, D] -> [B, H, T, D] copies (made outside any timing)."""
    return [x.transpose(1, 2).contiguous() for x in (q, k, v)]


def sdpa_causal_fn(q, k, v):
    """SDPA causal on the flash backend (CUDA) with grouped-query K/V; falls back to K/V expanded
    to every query head (outside the timing) if this torch's flash backend refuses enable_gqa."""
    qt, kt, vt = _sdpa_layout(q, k, v)
    G = q.shape[2] // k.shape[2]
    note = ""
    if qt.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def call(a, b, c, **kw):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(a, b, c, is_causal=True, **kw)
    else:
        def call(a, b, c, **kw):
            return F.scaled_dot_product_attention(a, b, c, is_causal=True, **kw)
    try:
        with torch.no_grad():
            call(qt[:, :, :64], kt[:, :, :64], vt[:, :, :64], enable_gqa=True)
        kw = dict(enable_gqa=True)
    except Exception:
        kt, vt = kt.repeat_interleave(G, 1), vt.repeat_interleave(G, 1)
        kw = {}
        note = "K/V expanded to H heads (no enable_gqa on this backend)"
    return (lambda: call(qt, kt, vt, **kw)), (qt, kt, vt), note


def sdpa_decode_fn(q, k, v):
    """SDPA for Tq = 1 at a cache of Tk: the GROUP query heads of a KV head as GROUP queries of one
    [B, H_kv, GROUP, D] problem over [B, H_kv, Tk, D] (exact for a single query: it sees every key)."""
    B, Tq, H, D = q.shape
    Hkv = k.shape[2]
    assert Tq == 1
    qg = q.reshape(B, Hkv, H // Hkv, D)
    kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    return lambda: F.scaled_dot_product_attention(qg, kt, vt)


def make_case(impl: str, mode: str, B: int, T: int, H: int, Hkv: int, D: int, dtype=torch.bfloat16, device="cuda",
              requires_grad: bool = True, seed: int = 0):
    """(fn, leaves) for one measurement (``common.timed_call``): impl "hip_attention" (estimation +
    attention every call), "hip_attention_masked" (a mask made once, reused), or "sdpa" (causal,
    K/V expanded to every head outside the timing); mode "fwd", "bwd" or "fwdbwd"."""
    import subquad

    q, k, v = make_qkv(B, T, H, Hkv, D, dtype, device, seed=seed)
    do = torch.randn_like(q)
    if impl == "sdpa":
        qt, kt, vt = _sdpa_layout(q, k, v)
        kt, vt = kt.repeat_interleave(H // Hkv, 1), vt.repeat_interleave(H // Hkv, 1)
        return common.timed_call(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True), qt, kt, vt,
                                 do.transpose(1, 2).contiguous(), mode, requires_grad)
    if impl == "hip_attention":
        attn = lambda a, b, c: subquad.hip_attention(a, b, c, **PARAMS)  # noqa: E731
    elif impl == "hip_attention_masked":
        mask = subquad.hip_mask(q, k, **PARAMS)
        attn = lambda a, b, c: subquad.hip_attention(a, b, c, mask=mask, **PARAMS)  # noqa: E731
    else:
        raise ValueError(f"unknown implementation {impl!r}")
    return common.timed_call(attn, q, k, v, do, mode, requires_grad)


# ----------------------------------------------------------------------------------------------
# attention-mass capture


def visible_rows(blocks_bh, r0, r1, Tq, Tk, bsq, bk, S, W):
    """bool [r1 - r0, Tk]: which keys queries r0..r1-1 of one (batch, head) attend (the contract)."""
    dev = blocks_bh.device
    i = torch.arange(r0, r1, device=dev)
    p = Tk - Tq + i
    qb = i // bsq
    E = Tk - Tq + qb * bsq - W + 1
    b = blocks_bh[qb].long()  # [rows, Kb]
    tok = S + b[..., None] * bk + torch.arange(bk, device=dev)
    ok = (b >= 0)[..., None] & (tok < E[:, None, None])
    sel = torch.zeros(r1 - r0, Tk + 1, dtype=torch.bool, device=dev)
    sel.scatter_(1, torch.where(ok, tok, torch.full_like(tok, Tk)).reshape(r1 - r0, -1), True)
    j = torch.arange(Tk, device=dev)
    return (j[None, :] <= p[:, None]) & ((j < S)[None, :] | (j[None, :] >= E[:, None]) | sel[:, :Tk])


def capture_fraction(q, k, blocks, p: dict, chunk: int = 512) -> dict:
    """Mean over (query, head) of the causal softmax mass on the keys HiP attends, and of the
    fraction of causal keys it attends (the capture of uniform attention), in fp32 chunks."""
    B, Tq, H, D = q.shape
    Tk, Hkv = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = D ** -0.5
    mass = cover = 0.0
    n = 0
    for b in range(B):
        for h in range(H):
            kh = k[b, :, h // G].float()
            for r0 in range(0, Tq, chunk):
                r1 = min(r0 + chunk, Tq)
                s = (q[b, r0:r1, h].float() @ kh.T) * scale
                pos = Tk - Tq + torch.arange(r0, r1, device=q.device)
                causal = torch.arange(Tk, device=q.device)[None, :] <= pos[:, None]
                prob = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
                vis = visible_rows(blocks[b, h], r0, r1, Tq, Tk, p["block_size_q"], p["block_size_k"],
                                   p["sink_tokens"], p["window"])
                mass += float((prob * vis).sum())
                cover += float((vis.sum(-1).float() / causal.sum(-1).float()).sum())
                n += r1 - r0
    return {"capture": mass / n, "coverage": cover / n}


def run_capture(device: str, quick: bool) -> List[dict]:
    import subquad

    shape = MASS_SHAPE_GPU if device == "cuda" else MASS_SHAPE_CPU
    p = PARAMS if device == "cuda" else MASS_PARAMS_CPU
    T = shape["T_quick"] if quick else shape["T"]
    rows = []
    for kind in ("gaussian", "local"):
        q, k, v = make_qkv(1, T, shape["H"], shape["Hkv"], shape["D"], torch.float32, device, seed=11, kind=kind)
        q = q * LOGIT_STD
        dt = torch.bfloat16 if device == "cuda" else torch.float32
        mask = subquad.hip_mask(q.to(dt), k.to(dt), **p)
        res = capture_fraction(q, k, mask.blocks, p)
        rows.append(dict(kind=kind, T=T, H=shape["H"], D=shape["D"], dtype=str(dt).replace("torch.", ""),
                         topk=p["topk"], window=p["window"], **res))
        print(f"[bench] capture {kind:8s} T={T}: mass {res['capture']:.3f}, keys covered {res['coverage']:.3f}",
              flush=True)
    return rows


# ----------------------------------------------------------------------------------------------
# GPU benchmark


def _measure(what: str, fn, leaves=None) -> dict:
    def one():
        fn()
        torch.cuda.synchronize()
        return common.gpu_ms(fn, leaves), common.gpu_peak_mib(fn, leaves)

    val, note = common.attempt(what, one)
    out = {"ms": val[0] if val else None, "peak_mib": val[1] if val else None}
    if note:
        out["note"] = note
    print(f"[bench] {what}: {fmt(out['ms'])} ms, peak {fmt(out['peak_mib'], '.0f')} MiB {note or ''}", flush=True)
    return out


def prefill_rows(T: int, quick: bool, deadline: common.Deadline) -> List[dict]:
    import subquad
    from subquad.kernels.hip import hip_sparse_attention

    B, H, Hkv, D = GPU_SHAPE["B"], GPU_SHAPE["H"], GPU_SHAPE["Hkv"], GPU_SHAPE["D"]
    q, k, v = make_qkv(B, T, H, Hkv, D, torch.bfloat16, "cuda", seed=T)
    geo = _geo(PARAMS)
    rows = []

    def add(impl, mode, res, **extra):
        rows.append(dict(T=T, impl=impl, mode=mode, **res, **extra))

    if deadline.expired():
        return [dict(T=T, impl="-", mode="-", note="skipped: time budget")]
    mask, note = common.attempt("hip_mask", lambda: subquad.hip_mask(q, k, **PARAMS))
    if mask is None:
        add("hip_mask", "fwd", {"ms": None, "note": note})
        return rows
    add("hip_mask", "fwd", _measure(f"prefill T={T} hip_mask", lambda: subquad.hip_mask(q, k, **PARAMS)))
    blocks = mask.blocks
    add("hip_attention_masked", "fwd",
        _measure(f"prefill T={T} attention (fixed mask)", lambda: hip_sparse_attention(q, k, v, blocks, **geo)))
    add("hip_attention", "fwd", _measure(f"prefill T={T} hip_attention (estimation + attention)",
                                         lambda: subquad.hip_attention(q, k, v, **PARAMS)))
    fn, _, sd_note = sdpa_causal_fn(q, k, v)
    add("sdpa_flash_causal", "fwd", _measure(f"prefill T={T} SDPA causal (flash)", fn), sdpa_note=sd_note)
    if not quick and not deadline.expired():
        do = torch.randn_like(q)
        attn = lambda a, b_, c: hip_sparse_attention(a, b_, c, blocks, **geo)  # noqa: E731
        fn, leaves = common.timed_call(attn, q.detach().clone(), k.detach().clone(), v.detach().clone(), do,
                                       "fwdbwd", True)
        add("hip_attention_masked", "fwdbwd", _measure(f"prefill T={T} attention fwd+bwd (fixed mask)", fn, leaves))
        qt, kt, vt = _sdpa_layout(q, k, v)
        kw = {"enable_gqa": True} if not sd_note else {}
        if sd_note:
            kt, vt = kt.repeat_interleave(H // Hkv, 1), vt.repeat_interleave(H // Hkv, 1)

        def sdpa_attn(a, b_, c):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(a, b_, c, is_causal=True, **kw)

        fn, leaves = common.timed_call(sdpa_attn, qt, kt, vt, do.transpose(1, 2).contiguous(), "fwdbwd", True)
        add("sdpa_flash_causal", "fwdbwd", _measure(f"prefill T={T} SDPA causal fwd+bwd", fn, leaves))
    hip_attn = hip_attn_module()
    if hip_attn is not None:
        add("hip_attn", "fwd", {"ms": None, "note": "importable but not wired (API unknown when written)"})
    return rows


def decode_rows(Tk: int, deadline: common.Deadline) -> List[dict]:
    import subquad
    from subquad.kernels.hip import hip_sparse_attention

    B, H, Hkv, D = GPU_SHAPE["B"], GPU_SHAPE["H"], GPU_SHAPE["Hkv"], GPU_SHAPE["D"]
    if deadline.expired():
        return [dict(Tk=Tk, impl="-", note="skipped: time budget")]
    q, k, v = make_qkv(B, Tk, H, Hkv, D, torch.bfloat16, "cuda", seed=Tk + 1, Tq=1)
    rows = []
    mask, note = common.attempt("hip_mask decode", lambda: subquad.hip_mask(q, k, **PARAMS))
    if mask is None:
        return [dict(Tk=Tk, impl="hip_mask", ms=None, note=note)]
    geo = _geo(PARAMS)
    rows.append(dict(Tk=Tk, impl="hip_reused_mask", **_measure(
        f"decode Tk={Tk} attention (reused mask)", lambda: hip_sparse_attention(q, k, v, mask.blocks, **geo))))
    rows.append(dict(Tk=Tk, impl="hip_attention_reused_mask", **_measure(
        f"decode Tk={Tk} hip_attention(mask=...)", lambda: subquad.hip_attention(q, k, v, mask=mask, **PARAMS))))
    # the same step on a head-major [B, H_kv, T, D] cache passed transposed: read in place (kv_in_place)
    kh, vh = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (k, v))
    rows.append(dict(Tk=Tk, impl="hip_attention_reused_mask_head_major_cache", **_measure(
        f"decode Tk={Tk} hip_attention(mask=...), head-major cache",
        lambda: subquad.hip_attention(q, kh, vh, mask=mask, **PARAMS))))
    del kh, vh
    rows.append(dict(Tk=Tk, impl="hip_fresh_mask", **_measure(
        f"decode Tk={Tk} hip_attention (estimation + attention)", lambda: subquad.hip_attention(q, k, v, **PARAMS))))
    rows.append(dict(Tk=Tk, impl="sdpa", **_measure(f"decode Tk={Tk} SDPA", sdpa_decode_fn(q, k, v))))
    # both again as a serving engine runs a decoding step: captured in a CUDA graph (no host time)
    for impl, fn in (("hip_attention_reused_mask_graph", lambda: subquad.hip_attention(q, k, v, mask=mask, **PARAMS)),
                     ("sdpa_graph", sdpa_decode_fn(q, k, v))):
        replay, note = common.attempt(f"decode Tk={Tk} {impl} capture", lambda: common.cuda_graph(fn))
        rows.append(dict(Tk=Tk, impl=impl, **(_measure(f"decode Tk={Tk} {impl}", replay) if replay else
                                              dict(ms=None, note=note))))
    return rows


def summarize_gpu(payload: dict) -> dict:
    pre = {(r["T"], r["impl"], r["mode"]): r.get("ms") for r in payload["prefill"]}
    dec = {(r["Tk"], r["impl"]): r.get("ms") for r in payload["decode"]}
    per_t = []
    for T in payload["config"]["prefill_T"]:
        sd = pre.get((T, "sdpa_flash_causal", "fwd"))
        per_t.append({"T": T, "end_to_end_vs_sdpa": ratio(sd, pre.get((T, "hip_attention", "fwd"))),
                      "attention_vs_sdpa": ratio(sd, pre.get((T, "hip_attention_masked", "fwd"))),
                      "estimation_share": ratio(pre.get((T, "hip_mask", "fwd")), pre.get((T, "hip_attention", "fwd"))),
                      "fwdbwd_vs_sdpa": ratio(pre.get((T, "sdpa_flash_causal", "fwdbwd")),
                                              pre.get((T, "hip_attention_masked", "fwdbwd")))})
    per_tk = [{"Tk": Tk, "reused_vs_sdpa": ratio(dec.get((Tk, "sdpa")), dec.get((Tk, "hip_reused_mask"))),
               "api_reused_vs_sdpa": ratio(dec.get((Tk, "sdpa")), dec.get((Tk, "hip_attention_reused_mask"))),
               "fresh_vs_sdpa": ratio(dec.get((Tk, "sdpa")), dec.get((Tk, "hip_fresh_mask"))),
               "graph_vs_sdpa_graph": ratio(dec.get((Tk, "sdpa_graph")), dec.get((Tk, "hip_attention_reused_mask_graph")))}
              for Tk in payload["config"]["decode_Tk"]]
    e2e = next((p["end_to_end_vs_sdpa"] for p in per_t if p["T"] == TARGET_T), None)
    d128 = next((p["api_reused_vs_sdpa"] for p in per_tk if p["Tk"] == TARGET_T), None)
    mem = common.growth_exponent(payload["config"]["prefill_T"],
                                 [next((r.get("peak_mib") for r in payload["prefill"]
                                        if r["T"] == T and r["impl"] == "hip_attention" and r["mode"] == "fwd"), None)
                                  for T in payload["config"]["prefill_T"]])
    targets = [
        common.target_line("prefill at 128k: hip_attention (estimation + attention) >= 4x faster than SDPA causal "
                           "(x)", e2e, None if e2e is None else e2e >= 4),
        common.target_line("decoding one token at Tk=128k with a reused mask (hip_attention(mask=...)) >= 8x faster "
                           "than SDPA (x)", d128, None if d128 is None else d128 >= 8),
        common.target_line("memory O(T): growth exponent of hip_attention's peak between the two largest T "
                           "(<= 1.1)", mem, None if mem is None else mem <= 1.1),
    ]
    return {"per_T": per_t, "per_Tk": per_tk, "targets": targets}


def gpu_markdown(payload: dict) -> str:
    cfg, info, s = payload["config"], payload["env"], payload["summary"]
    out = [f"## HiP attention on {info['gpu']}",
           f"commit {info['commit']}, torch {info['torch']}, triton {info['triton']}; bf16, B={cfg['B']}, "
           f"H={cfg['H']}, H_kv={cfg['Hkv']}, D={cfg['D']}; {cfg['params']}; do_bench medians (ms); peak = "
           "max_memory_allocated minus the inputs. hip-attn: " + (cfg["hip_attn"] or "not importable"), "",
           "### Prefill", ""]
    out.append(common.markdown_table(
        ["T", "impl", "mode", "ms", "peak MiB", "note"],
        [[r["T"], r["impl"], r.get("mode", ""), fmt(r.get("ms")), fmt(r.get("peak_mib"), ".0f"),
          " ".join(x for x in (r.get("note", ""), r.get("sdpa_note", "")) if x)] for r in payload["prefill"]]))
    out += ["", common.markdown_table(
        ["T", "end to end vs SDPA (x)", "attention only vs SDPA (x)", "estimation / end to end",
         "attention fwd+bwd vs SDPA (x)"],
        [[p["T"], fmt(p["end_to_end_vs_sdpa"], ".2f"), fmt(p["attention_vs_sdpa"], ".2f"),
          fmt(p["estimation_share"], ".2f"), fmt(p["fwdbwd_vs_sdpa"], ".2f")] for p in s["per_T"]]),
        "", "### Decoding one token", ""]
    out.append(common.markdown_table(
        ["Tk", "impl", "ms", "peak MiB", "note"],
        [[r["Tk"], r["impl"], fmt(r.get("ms")), fmt(r.get("peak_mib"), ".0f"), r.get("note", "")]
         for r in payload["decode"]]))
    out += ["", common.markdown_table(
        ["Tk", "kernel, reused mask vs SDPA (x)", "hip_attention(mask=...) vs SDPA (x)", "fresh mask vs SDPA (x)",
         "both in CUDA graphs (x)"],
        [[p["Tk"], fmt(p["reused_vs_sdpa"], ".2f"), fmt(p["api_reused_vs_sdpa"], ".2f"),
          fmt(p["fresh_vs_sdpa"], ".2f"), fmt(p.get("graph_vs_sdpa_graph"), ".2f")] for p in s["per_Tk"]])]
    out += ["", "### Attention mass captured", "", _capture_table(payload["capture"])]
    out += ["", "Targets:", ""] + [f"- {t['text']}" for t in s["targets"]]
    return "\n".join(out)


def _capture_table(rows: List[dict]) -> str:
    return common.markdown_table(
        ["keys", "T", "H", "D", "dtype (mask)", "topk", "window", "mass captured", "causal keys covered"],
        [[r["kind"], r["T"], r["H"], r["D"], r["dtype"], r["topk"], r["window"], fmt(r["capture"], ".3f"),
          fmt(r["coverage"], ".3f")] for r in rows])


def plot_gpu(payload: dict, path: str) -> Optional[str]:
    Ts = payload["config"]["prefill_T"]

    def series(impl, mode="fwd"):
        by = {(r["T"], r["impl"], r["mode"]): r.get("ms") for r in payload["prefill"]}
        return Ts, [by.get((T, impl, mode)) for T in Ts]

    return common.plot(path, f"HiP attention, {payload['env']['gpu']}", [
        {"title": "prefill forward", "xlabel": "T", "ylabel": "ms (median)",
         "series": {"hip_attention (est. + attn)": series("hip_attention"), "hip_mask": series("hip_mask"),
                    "attention (fixed mask)": series("hip_attention_masked"),
                    "SDPA causal (flash)": series("sdpa_flash_causal")}}])


def run_gpu(quick: bool, out_dir: str, budget: Optional[float] = None) -> dict:
    deadline = common.Deadline(budget)
    hip_attn = hip_attn_module()
    Ts = PREFILL_T_QUICK if quick else PREFILL_T
    payload = {"family": NAME, "device": "cuda", "quick": quick, "env": common.env_info(),
               "config": dict(GPU_SHAPE, params=PARAMS, prefill_T=Ts, decode_Tk=DECODE_TK,
                              hip_attn=getattr(hip_attn, "__version__", "importable") if hip_attn else None,
                              logit_std=LOGIT_STD, ar_rho=AR_RHO),
               "prefill": [], "decode": [], "capture": []}
    stem = f"{NAME}_cuda"

    def write():
        payload["summary"] = summarize_gpu(payload)
        return common.write_results(out_dir, stem, payload, gpu_markdown(payload), quick, plot_gpu)

    # the smallest prefill first (it tunes the prefill kernels at a cheap size), then decoding
    # (cheap; the decoding bucket is tuned apart), then the larger prefills, then the capture
    for T in Ts[:1]:
        payload["prefill"] += prefill_rows(T, quick, deadline)
        torch.cuda.empty_cache()
        write()
    for Tk in DECODE_TK:
        payload["decode"] += decode_rows(Tk, deadline)
        torch.cuda.empty_cache()
        write()
    for T in Ts[1:]:
        payload["prefill"] += prefill_rows(T, quick, deadline)
        torch.cuda.empty_cache()
        write()
    if not deadline.expired():
        payload["capture"], note = common.attempt("capture", lambda: run_capture("cuda", quick))
        payload["capture"] = payload["capture"] or []
    where = write()
    print(gpu_markdown(payload))
    print(f"\n[bench] wrote {where}; results to keep go to bench/results/{common.device_slug(payload['env'])}/")
    return payload


# ----------------------------------------------------------------------------------------------
# CPU benchmark


def cpu_forward_case(impl: str, T: int, B: int, H: int, Hkv: int, D: int, threads: Optional[int] = None):
    """Target of ``common.cpu_case`` (child process): one forward, no autograd, fp32."""
    import subquad

    if threads:
        torch.set_num_threads(threads)
    q, k, v = make_qkv(B, T, H, Hkv, D, torch.float32, "cpu", seed=T)
    if impl == "sdpa":
        qt, kt, vt = _sdpa_layout(q, k, v)
        kt, vt = kt.repeat_interleave(H // Hkv, 1), vt.repeat_interleave(H // Hkv, 1)
        fn = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
    elif impl == "hip_mask":
        fn = lambda: subquad.hip_mask(q, k, **PARAMS)  # noqa: E731
    elif impl == "hip_attention_masked":
        mask = subquad.hip_mask(q, k, **PARAMS)
        fn = lambda: subquad.hip_attention(q, k, v, mask=mask, **PARAMS)  # noqa: E731
    elif impl == "hip_attention":
        fn = lambda: subquad.hip_attention(q, k, v, **PARAMS)  # noqa: E731
    else:
        raise ValueError(impl)

    def call():
        with torch.no_grad():
            return fn()

    return call


CPU_IMPLS = ["hip_attention", "hip_mask", "hip_attention_masked", "sdpa"]


def cpu_markdown(payload: dict) -> str:
    cfg, info = payload["config"], payload["env"]
    by = {(r["impl"], r["T"]): r for r in payload["rows"]}
    out = [f"## HiP attention on CPU ({info['cpu']}, {info['cpu_threads']} threads): reference path vs SDPA causal",
           f"commit {info['commit']}, torch {info['torch']}; fp32, B={cfg['B']}, H={cfg['H']}, H_kv={cfg['Hkv']}, "
           f"D={cfg['D']}; {cfg['params']}; forward without autograd, median of {cfg['reps']} calls after a "
           "warm-up, each case in a fresh process.", ""]
    table = []
    for T in cfg["T"]:
        r = {i: by.get((i, T), {}) for i in CPU_IMPLS}
        table.append([T] + [fmt(r[i].get("ms")) for i in CPU_IMPLS]
                     + [fmt(ratio(r["sdpa"].get("ms"), r["hip_attention"].get("ms")), ".2f"),
                        fmt(r["hip_attention"].get("peak_mib"), ".1f"), fmt(r["sdpa"].get("peak_mib"), ".1f"),
                        " ".join(dict.fromkeys(x["error"] for x in r.values() if x.get("error")))])
    out.append(common.markdown_table(
        ["T", "hip_attention ms", "hip_mask ms", "attention (reused mask) ms", "SDPA causal ms",
         "end to end vs SDPA (x)", "hip_attention peak MiB", "SDPA peak MiB", "note"], table))
    if payload.get("capture"):
        out += ["", "Attention mass captured (CPU, reference selection):", "", _capture_table(payload["capture"])]
    out += ["", f"Memory: {common.CPU_MEMORY_METHOD}."]
    out += common.load_warning(info)
    return "\n".join(out)


def plot_cpu(payload: dict, path: str) -> Optional[str]:
    Ts = payload["config"]["T"]
    by = {(r["impl"], r["T"]): r for r in payload["rows"]}
    return common.plot(path, "HiP attention on CPU (reference path)", [
        {"title": "forward time", "xlabel": "T", "ylabel": "ms (median)",
         "series": {i: (Ts, [by.get((i, T), {}).get("ms") for T in Ts]) for i in CPU_IMPLS}}])


def run_cpu(quick: bool, out_dir: str, budget: Optional[float] = None, threads: Optional[int] = None) -> dict:
    B, H, Hkv, D = CPU_SHAPE["B"], CPU_SHAPE["H"], CPU_SHAPE["Hkv"], CPU_SHAPE["D"]
    Ts = CPU_T_QUICK if quick else CPU_T
    reps = 1 if quick else 3
    deadline = common.Deadline(budget)
    payload = {"family": NAME, "device": "cpu", "quick": quick, "env": common.env_info(),
               "config": dict(CPU_SHAPE, T=Ts, reps=reps, params=PARAMS, capture_params=MASS_PARAMS_CPU),
               "rows": [], "capture": []}
    for T in Ts:
        for impl in CPU_IMPLS:
            row = {"T": T, "impl": impl}
            if deadline.expired():
                row.update(ms=None, peak_mib=None, error="skipped: time budget")
            else:
                case = dict(impl=impl, T=T, B=B, H=H, Hkv=Hkv, D=D, threads=threads)
                row.update(common.cpu_case(f"bench.{NAME}:cpu_forward_case", case, reps=reps,
                                           timeout=deadline.remaining(1800) + 30))
                print(f"[bench] cpu {impl:22s} T={T}: {fmt(row.get('ms'))} ms, peak {fmt(row.get('peak_mib'), '.1f')} "
                      "MiB", flush=True)
            payload["rows"].append(row)
    if not deadline.expired():
        payload["capture"] = common.attempt("capture", lambda: run_capture("cpu", quick))[0] or []
    md = cpu_markdown(payload)
    where = common.write_results(out_dir, f"{NAME}_cpu", payload, md, quick, plot_cpu)
    print(md)
    print(f"\n[bench] wrote {where}")
    return payload


# ----------------------------------------------------------------------------------------------
# correctness check (python -m bench)

GPU_CHECKS = [
    dict(name="fp16 prefill T=1000 GQA topk 128", B=1, Tq=1000, Tk=1000, H=4, Hkv=2, D=128, dtype=torch.float16,
         params=dict(PARAMS, topk=128, window=64)),
    dict(name="bf16 decode Tq=2 Tk=5000", B=1, Tq=2, Tk=5000, H=8, Hkv=2, D=128, dtype=torch.bfloat16,
         params=PARAMS),
]
CPU_CHECKS = [
    dict(name="fp32 prefill T=67 GQA bk 3", B=1, Tq=67, Tk=67, H=2, Hkv=1, D=16, dtype=torch.float32,
         params=dict(topk=12, block_size_q=16, block_size_k=3, query_stride=2, sink_tokens=4, window=8)),
    dict(name="fp16 decode Tq=1 Tk=211", B=1, Tq=1, Tk=211, H=2, Hkv=2, D=16, dtype=torch.float16,
         params=dict(topk=32, block_size_q=16, block_size_k=2, query_stride=2, sink_tokens=8, window=16)),
]


def _check_case(name, B, Tq, Tk, H, Hkv, D, dtype, params, device) -> List[dict]:
    """Kernel vs the float64 dense definition (o, dq, dk, dv) on the selection hip_mask makes;
    pass rule of the tests: error <= 2 x (reference path's error in the kernel's dtype) + atol."""
    import subquad
    from subquad.kernels.hip import hip_sparse_attention
    from subquad.reference import hip as ref

    gen = torch.Generator().manual_seed(4321)
    q = torch.randn(B, Tq, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, Tk, Hkv, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, Tk, Hkv, D, generator=gen, dtype=torch.float64)
    do = torch.randn(B, Tq, H, D, generator=gen, dtype=torch.float64)
    mask = subquad.hip_mask(q.to(device, dtype), k.to(device, dtype), **params)
    geo = _geo(params)

    def run(fn, dt):
        leaves = [x.to(device=device, dtype=dt).requires_grad_() for x in (q, k, v)]
        o = fn(*leaves)
        grads = torch.autograd.grad(o, leaves, do.to(device, o.dtype))
        return dict(zip(["o", "dq", "dk", "dv"], [o, *grads]))

    kernel = run(lambda a, b, c: hip_sparse_attention(a, b, c, mask.blocks, **geo), dtype)
    lowp = run(lambda a, b, c: ref.hip_attention_reference(a, b, c, mask.blocks, **geo), dtype)
    exact = run(lambda a, b, c: ref.hip_attention_naive(a, b, c, mask.blocks, **geo), torch.float64)
    return common.tolerance_rows(NAME, name, kernel, lowp, exact, dtype)


def check() -> List[dict]:
    """Triton kernels vs the float64 definition, forward and backward: natively on a GPU, else
    through the Triton interpreter (TRITON_INTERPRET=1 set before triton's import; python -m bench
    does it) at small sizes."""
    cuda = common.require_kernels()
    rows = []
    for case in GPU_CHECKS if cuda else CPU_CHECKS:
        rows += _check_case(device="cuda" if cuda else "cpu", **case)
    return rows


# ----------------------------------------------------------------------------------------------
# output


def run(quick: bool = True, out_dir: str = common.DEFAULT_OUT, budget: Optional[float] = None, device: str = "auto",
        threads: Optional[int] = None) -> dict:
    """The benchmark on the GPU when there is one (or device="cuda"), else on the CPU."""
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return run_gpu(quick, out_dir, budget)
    return run_cpu(quick, out_dir, budget, threads)


def main(argv=None) -> int:
    p = common.base_parser(__doc__, quick_help="GPU: prefill 32k and 128k forward; CPU: T=4k")
    args = p.parse_args(argv)
    run(args.quick, args.out, args.budget, args.device, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
