"""Compile every Triton kernel of torchkit for sm_90 ahead of time and report its SASS (run by test_ops.py).

Prints one JSON line: {kernel: {"ffma": count, "local_memory": count of STL/LDL, "registers": n}}.
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

from torchkit.ops._triton import ef

NUM_WARPS = ef.NUM_WARPS


def kernels():
    """(name, kernel, signature, constexprs) in the configurations the driver launches."""
    vec = {"g_ptr": "*fp32", "e_ptr": "*fp32", "h_ptr": "*fp32"}
    for mode in range(5):
        ints = {n: "i32" for n in ef._SLOTS}
        hist = {**vec, "hist_ptr": "*i32", "scal_ptr": "*i32", "d": "i32", "eta": "fp32"}
        hist.update({n: "i32" for n in ef._SLOTS[:5]})
        for stored in (False, True) if mode == 1 else (False,):  # EF14's first pass stores v in e
            yield (
                f"hist[{mode},{stored}]",
                ef._hist_kernel,
                hist,
                dict(MODE=mode, STORED=stored, BLOCK=2048, NBINS=2048),
            )
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
        sel.update({n: ints[n] for n in ["active", "n_slot"] + ef._SLOTS[5:]})
        cx = dict(MODE=mode, STORED=mode == 1, WRITE_E=mode == 3, BLOCK=2048)
        yield f"select[{mode}]", ef._select_kernel, sel, cx
    scatter = {"out_ptr": "*fp32", "val_ptr": "*fp32", "idx_ptr": "*i32", "scale": "fp32", "k": "i32"}
    yield "scatter_add", ef._scatter_add_kernel, scatter, dict(BLOCK=1024)


def main() -> None:
    tool = shutil.which("cuobjdump") or str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, sig, cx in kernels():
            signature = {**sig, **{c: "constexpr" for c in cx}}
            constexprs = {(list(signature).index(c),): v for c, v in cx.items()}
            compiled = triton.compile(
                ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                target=GPUTarget("cuda", 90, 32),
                options={"enable_fp_fusion": False, "num_warps": NUM_WARPS},
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
            }
    print(json.dumps(report))


if __name__ == "__main__":
    sys.exit(main())
