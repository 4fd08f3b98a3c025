"""`import dwdp_comm` needs no GPU package: checked in a fresh interpreter that cannot import them."""
import subprocess
import sys
import textwrap

BLOCKED = ["cupy", "cupy_backends", "numba", "numba_cuda", "nvshmem", "cuda", "cuda_bindings", "cuda_core", "triton"]


def test_import_without_gpu_packages():
    code = textwrap.dedent(f"""
        import sys, importlib.abc
        BLOCKED = {BLOCKED!r}
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    raise ImportError("blocked for this test: " + name)
        sys.meta_path.insert(0, Block())
        for name in BLOCKED:  # the block works (else this test proves nothing)
            try:
                __import__(name)
            except ImportError:
                pass
            else:
                raise AssertionError(name + " was importable")
        import dwdp_comm, dwdp_comm.planner, dwdp_comm.testing, dwdp_comm.backends
        import dwdp_comm.group, dwdp_comm.layout, dwdp_comm.store, dwdp_comm.prefetch, dwdp_comm.backends.sim
        assert dwdp_comm.init and dwdp_comm.WeightStore and dwdp_comm.Prefetcher
        from dwdp_comm import backends
        reason = backends.probe("cuda_ipc")
        assert reason is not None, "cuda_ipc must report itself unavailable without cuda-python"
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded, loaded
        print("ok", dwdp_comm.__version__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok")

