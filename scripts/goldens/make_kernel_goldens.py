"""Dot products computed by llama.cpp's own CPU kernels, for formats no golden model uses.

    python3 scripts/goldens/make_kernel_goldens.py BUILD_DIR
    # writes kernels/tests/fixtures/ggml_dots.txt, ggml_gelu.txt and ggml_matmul.txt
    # (the last from ggml_matmul.c: one-token products through llama.cpp's repacking backend)

BUILD_DIR holds libggml-base.so and libggml-cpu.so from a llama.cpp build (the tree vendored
by llama-cpp-python 0.3.36, built as docs/perf.md describes: build/bin). Random rows
are quantized by ggml, activations are quantized by ggml to the format its dot product takes,
and each row's product comes from ggml's `vec_dot`, so the fixture pins llama.cpp's
summation order bit for bit.

It also records ggml's GELU table (GELU of every half float, rounded to half), which
llama.cpp looks up instead of computing GELU: an FNV-1a hash of the entries kiln uses (inputs
strictly between -10 and 10) and a few entries in the clear.

The files are plain text so the kernel tests need no parser: per case a line
`case TYPE LABEL ROWS COLS`, then `weights HEX`, `activations HEX` and `dots BITS...` (each
result's f32 bits in decimal).
"""
import ctypes, os, sys
import numpy as np

TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q2_K": 10, "Q3_K": 11, "Q5_K": 13, "Q6_K": 14}
ROWS, ROW_LEN = 4, 512
# Rows of a single k-quant super-block (hidden sizes of 256), which real models seldom have.
SHORT_ROWS = {"Q2_K": 10, "Q3_K": 11, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

def main(build):
    base = ctypes.CDLL(os.path.join(build, "libggml-base.so"), mode=ctypes.RTLD_GLOBAL)
    cpu = ctypes.CDLL(os.path.join(build, "libggml-cpu.so"))
    cpu.ggml_cpu_init()

    class Traits(ctypes.Structure):
        _fields_ = [("from_float", ctypes.c_void_p), ("vec_dot", ctypes.c_void_p), ("vec_dot_type", ctypes.c_int), ("nrows", ctypes.c_int64)]

    cpu.ggml_get_type_traits_cpu.restype = ctypes.POINTER(Traits)
    base.ggml_row_size.restype = ctypes.c_size_t
    base.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    base.ggml_quantize_chunk.restype = ctypes.c_size_t
    base.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    from_float = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)
    vec_dot = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.POINTER(ctypes.c_float), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)

    rng = np.random.default_rng(7)
    cases = []
    shapes = [(name, ty, ROW_LEN) for name, ty in TYPES.items()] + [(name, ty, 256) for name, ty in SHORT_ROWS.items()]
    for name, ty, COLS in shapes:
        w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * 0.05
        row_bytes = base.ggml_row_size(ty, COLS)
        wq = np.zeros(ROWS * row_bytes, dtype=np.uint8)
        base.ggml_quantize_chunk(ty, w.ctypes.data, wq.ctypes.data, 0, ROWS, COLS, None)
        t = cpu.ggml_get_type_traits_cpu(ty).contents
        act_ty = t.vec_dot_type
        quantize = from_float(cpu.ggml_get_type_traits_cpu(act_ty).contents.from_float)
        dot = vec_dot(t.vec_dot)
        for label, scale_outliers in [("plain", 1.0), ("outliers", 40.0)]:
            label = label if COLS == ROW_LEN else f"{label}-{COLS}"
            x = rng.standard_normal(COLS).astype(np.float32)
            x[::97] *= scale_outliers
            xq = np.zeros(base.ggml_row_size(act_ty, COLS), dtype=np.uint8)
            quantize(x.ctypes.data, xq.ctypes.data, COLS)
            s = ctypes.c_float()
            out = []
            for r in range(ROWS):
                row = np.ascontiguousarray(wq[r * row_bytes:(r + 1) * row_bytes])
                dot(COLS, ctypes.byref(s), 0, row.ctypes.data, 0, xq.ctypes.data, 0, 1)
                out.append(int(np.float32(s.value).view(np.uint32)))
            cases.append(f"case {name} {label} {ROWS} {COLS}\nweights {wq.tobytes().hex()}\nactivations {xq.tobytes().hex()}\ndots {' '.join(map(str, out))}\n")
    path = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "tests", "fixtures", "ggml_dots.txt")
    with open(path, "w") as f:
        f.write("".join(cases))
    print(f"wrote {len(cases)} cases to {os.path.normpath(path)}")

    table = np.frombuffer(bytes((ctypes.c_uint16 * 65536).in_dll(cpu, "ggml_table_gelu_f16")), dtype=np.uint16)
    x = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    used = np.isfinite(x) & (x > -10) & (x < 10)
    h = 0xCBF29CE484222325
    for v in np.where(used, table, 0).tolist():
        for byte in (v & 0xFF, v >> 8):
            h = ((h ^ byte) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    spots = [0x0000, 0x3C00, 0xBC00, 0xBFFF, 0x4000, 0xC000, 0x3800, 0xC8FF]
    path = os.path.join(os.path.dirname(__file__), "..", "..", "kernels", "tests", "fixtures", "ggml_gelu.txt")
    with open(path, "w") as f:
        f.write(f"fnv1a64 {h:016x}\n")
        f.write("entries " + " ".join(f"{i:04x}:{int(table[i]):04x}" for i in spots) + "\n")
    print(f"wrote the GELU table digest to {os.path.normpath(path)}")

def matmul_fixture(build):
    """Builds ggml_matmul.c against the same llama.cpp tree (its headers sit two levels above
    BUILD_DIR's build folder) and writes its output to kernels/tests/fixtures/ggml_matmul.txt."""
    import subprocess, tempfile
    tree = os.path.abspath(os.path.join(build, "..", ".."))
    here = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "ggml_matmul")
        subprocess.run(["cc", "-O2", "-o", exe, os.path.join(here, "ggml_matmul.c"), f"-I{tree}/ggml/include", f"-L{build}",
                        "-lggml", "-lggml-base", "-lggml-cpu", f"-Wl,-rpath,{os.path.abspath(build)}"], check=True)
        out = subprocess.run([exe], check=True, capture_output=True, text=True).stdout
    path = os.path.join(here, "..", "..", "kernels", "tests", "fixtures", "ggml_matmul.txt")
    with open(path, "w") as f:
        f.write(out)
    print(f"wrote {out.count('case ')} cases to {os.path.normpath(path)}")


if __name__ == "__main__":
    main(sys.argv[1])
    matmul_fixture(sys.argv[1])
