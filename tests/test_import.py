import subprocess
import sys


def test_import_is_cheap_no_cuda_no_jit_no_plotting():
    code = (
        "import sys, torch, nestedsparse\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised on import'\n"
        "heavy = [m for m in ('numba', 'matplotlib', 'onnx', 'onnxruntime', 'nestedsparse.pack.kernels') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_public_surface():
    import nestedsparse as ns

    for name in ns.__all__:
        assert getattr(ns, name).__doc__, f"{name} has no docstring"
