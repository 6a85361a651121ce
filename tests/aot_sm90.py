"""Compile every Triton kernel of torchkit for sm_90 ahead of time and report its SASS (run by test_ops.py).

Prints one JSON line: {kernel: {"ffma": count, "local_memory": count of STL/LDL, "registers": n, "ld128": count
of 128-bit global loads, "st128": count of 128-bit global stores, "ld": count of all global loads, "inner_loop":
instructions in the innermost loop}}. Pointers are
compiled as 16-byte aligned, as Triton specialises them at launch for torch's allocations. ``pad=`` in a name: the
launch over flat vectors that own padding to a multiple of 16 elements (g, state), see torchkit.ops._padding.
"""

import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from torchkit.ops._triton import decode, ef, segments

NUM_WARPS = ef.NUM_WARPS


def kernels():
    """(name, kernel, signature, constexprs[, num_warps]) in the configurations the driver launches."""
    vec = {"g_ptr": "*fp32", "e_ptr": "*fp32", "h_ptr": "*fp32"}
    for mode in range(5):
        ints = {n: "i32" for n in ef._SLOTS + ["count_slot"]}
        hist = {**vec, "hist_ptr": "*i32", "scal_ptr": "*i32", "d": "i32", "eta": "fp32"}
        hist.update({n: "i32" for n in ef._SLOTS[:5]})
        for stored in (False, True) if mode == 1 else (False,):  # EF14's first pass stores v in e
            for g_pad, s_pad in _pads(mode):
                cx = dict(MODE=mode, STORED=stored, BLOCK=2048, NBINS=2048, G_PAD=g_pad, S_PAD=s_pad)
                yield f"hist[{mode},{stored}]" + _pad_name(g_pad, s_pad), ef._hist_kernel, hist, cx
        if mode != ef._select.CAND:  # level 1: the prediction from a sample and the streaming pass's ladder
            ladder = {**vec, "hist_ptr": "*i32", "scal_ptr": "*i32", "d": "i32", "eta": "fp32"}
            for g_pad, s_pad in _pads(mode):
                cx = dict(MODE=mode, BLOCK=ef.LADDER_BLOCK, LADDER=ef.LADDER, G_PAD=g_pad, S_PAD=s_pad)
                yield f"ladder[{mode}]" + _pad_name(g_pad, s_pad), ef._ladder_kernel, ladder, cx
            predict = {**vec, "scal_ptr": "*i32", "hint_ptr": "*i32", "d": "i32", "eta": "fp32", "need": "i32",
                       "cap": "i32"}  # fmt: skip
            one_pass = ((True, False), (True, True)) if ef._select.one_pass_takes(mode) else ()
            for one, approx in ((False, False), *one_pass):  # the ladder's; the one pass's, exact and approximate
                cx = dict(MODE=mode, SAMPLE=ef.SAMPLE, LADDER=ef.LADDER, ONE_PASS=one, APPROX=approx)
                yield f"predict[{mode},{one},{approx}]", ef._predict_kernel, predict, cx
        sel = {
            **vec,
            "ci_ptr": "*i32",
            "scal_ptr": "*i32",
            "lb_ptr": "*i64",
            "hi_idx": "*i32",
            "hi_val": "*fp32",
            "eq_idx": "*i32",
            "eq_val": "*fp32",
            "d": "i32",
            "eta": "fp32",
        }
        sel.update({n: ints[n] for n in ["active", "n_slot"] + ef._SLOTS[5:] + ["count_slot"]})
        for g_pad, s_pad in _pads(mode):
            cx = dict(MODE=mode, STORED=mode == 1, WRITE_E=mode == 3, BLOCK=2048, G_PAD=g_pad, S_PAD=s_pad, GE=False)
            yield f"select[{mode}]" + _pad_name(g_pad, s_pad), ef._select_kernel, sel, cx
            if mode != ef._select.CAND and ef._select.one_pass_takes(mode):  # the one pass (EF14 stores v in e)
                cx.update(STORED=False, GE=True)
                yield f"one_pass[{mode}]" + _pad_name(g_pad, s_pad), ef._select_kernel, sel, cx
    threshold = {"hist_ptr": "*i32", "scal_ptr": "*i32", "k": "i32", "cap": "i32"}
    for level in (0, 1, 2, 3, 4):  # 0 and 4: the one pass's gate and its level 1
        yield f"threshold[{level}]", ef._threshold_kernel, threshold, dict(LEVEL=level, NBINS=2048)
    window = {"hist_ptr": "*i32", "scal_ptr": "*i32", "k": "i32"}
    yield "window", ef._window_kernel, window, dict(LADDER=ef.LADDER), 1
    scatter = {"out_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32", "scale": "fp32", "k": "i32"}
    yield "scatter_add", ef._scatter_add_kernel, scatter, dict(BLOCK=1024)
    prepare = {"out_ptr": "*fp32", "checks_ptr": "*fp64", "n_checks": "i32", "stride": "i32", "d": "i32"}
    for zero in (True, False):  # a decode's first pass: zeros or out kept, NaN when a check is not finite
        yield f"prepare[{zero}]", ef._prepare_kernel, prepare, dict(ZERO=zero, NC=8, BLOCK=1024)
    seg = {**vec, "table_ptr": "*i64", "out_idx": "*i32", "out_val": "*fp32", "eta": "fp32"}
    for mode in (ef._select.EF14, ef._select.EF21, ef._select.ECONTROL):  # many small segments in one launch
        for one, approx in ((False, False), (True, False), (False, True)):
            cx = dict(MODE=mode, APPROX=approx, ONE_PASS=one, BLOCK=1024)
            yield f"segments[{mode},{one},{approx}]", segments._segments_kernel, seg, cx, 4
    runs = {"idx_ptr": "*i32", "istride": "i32", "k": "i32", "span": "i32", "table_ptr": "*i32", "S": "i32"}
    yield "decode_runs", decode._runs_kernel, runs, dict(BLOCK=decode.RUN_BLOCK), decode.NUM_WARPS
    tiled = {"out_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32", "vstride": "i32", "istride": "i32",
             "scale_ptr": "*fp32", "scale": "fp32", "n": "i32", "k": "i32", "d": "i32", "table_ptr": "*i32",
             "S": "i32", "checks_ptr": "*fp64", "n_checks": "i32", "cstride": "i32", "tiles_per_program": "i32",
             "steps": "i32"}  # fmt: skip
    for zero, poison, row_scales in ((True, True, False), (False, False, True)):  # a round's decode in one launch
        cx = dict(ZERO=zero, POISON=poison, ROW_SCALES=row_scales, NR=32, SP=64, NC=8, TILE_=decode.TILE,
                  CHUNK_=decode.CHUNK)  # fmt: skip
        yield f"decode_tiled[{zero},{poison},{row_scales}]", decode._tiled_kernel, tiled, cx, decode.NUM_WARPS


def _pads(mode):
    """(g, state) padding of the launches over the method's vector: none, the state only (the DDP hook: the
    gradient is DDP's bucket), both (the optimizer's own flat gradient); top-k has no state, candidates no padding."""
    if mode == ef._select.CAND:
        return [(False, False)]
    if mode == ef._select.TOPK:
        return [(False, False), (True, False)]
    return [(False, False), (False, True), (True, True)]


def _pad_name(g_pad, s_pad):
    return "" if not (g_pad or s_pad) else f" pad={'g' if g_pad else ''}{'s' if s_pad else ''}"


def _inner_loop(sass: str) -> int | None:
    """Instructions in the innermost loop: the shortest span a backward branch jumps over (None: no loop)."""
    spans = [
        (int(at, 16) - int(to, 16)) // 16 + 1
        for at, to in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?P\w+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass)
        if int(to, 16) < int(at, 16)
    ]
    return min(spans, default=None)


def main() -> None:
    tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, sig, cx, *warps in kernels():
            signature = {**sig, **{c: "constexpr" for c in cx}}
            constexprs = {(list(signature).index(c),): v for c, v in cx.items()}
            aligned = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=aligned),
                target=GPUTarget("cuda", 90, 32),
                options={"enable_fp_fusion": False, "num_warps": warps[0] if warps else NUM_WARPS},
            )
            cubin = Path(tmp) / "k.cubin"
            cubin.write_bytes(compiled.asm["cubin"])
            sass = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
            res = subprocess.run([tool, "-res-usage", str(cubin)], capture_output=True, text=True).stdout
            regs = re.search(r"REG:(\d+)", res)
            report[name] = {
                "ffma": len(re.findall(r"\bFFMA\b", sass)),
                "local_memory": len(re.findall(r"\b(STL|LDL)\b", sass)),
                "registers": int(regs.group(1)) if regs else None,
                "ld128": len(re.findall(r"\bLDG\.E\.128\b", sass)),
                "st128": len(re.findall(r"\bSTG\.E\.128\b", sass)),
                "ld": len(re.findall(r"\bLDG\.", sass)),
                "inner_loop": _inner_loop(sass),
            }
    print(json.dumps(report))
    if len(sys.argv) > 2 and sys.argv[1] == "--out":  # a committed record: benchmarks/results/aot-sm90/sass.json
        meta = {"target": "sm_90, compiled ahead of time (no GPU)", "triton": triton.__version__}
        Path(sys.argv[2]).write_text(json.dumps({**meta, "kernels": report}, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
