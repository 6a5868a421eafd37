"""Host synchronizations per decode step and kernel launches per MoE layer, counted on CPU (issue 14).

    python -m bench.host_syncs [--backend torch|triton] [--batch 4] [--steps 3] [--eplb]

Counted by construction, from calls made by the project's own code (engine/, model/, kernels/;
calls inside torch, triton's interpreter or the test harness are not counted):
  d2h  Tensor.item / tolist / cpu / numpy / bool / int / float: each waits for the device on CUDA
  h2d  torch.tensor(..., device=X) and Tensor.to(X) without non_blocking: a blocking copy on CUDA
Launches per MoE layer: aten ops dispatched (TorchDispatchMode: one per kernel on a GPU, roughly)
plus Triton kernel launches, during one MoE layer's forward in a decode step.
With --backend triton, kernels run under TRITON_INTERPRET=1 (set here when there is no GPU).
"""
import argparse
import os
import sys

if __name__ == "__main__" and "--backend" in sys.argv and "triton" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = tuple(os.path.join(ROOT, d) + os.sep for d in ("engine", "model", "kernels"))


def _from_project(depth: int = 2) -> bool:
    f = sys._getframe(depth)
    return f.f_code.co_filename.startswith(OURS)


class HostSyncCounter:
    D2H = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")

    def __init__(self):
        self.d2h = self.h2d = 0
        self.saved = []
        self.sites: dict[str, int] = {}

    def _site(self):
        f = sys._getframe(3)
        key = f"{os.path.relpath(f.f_code.co_filename, ROOT)}:{f.f_lineno}"
        self.sites[key] = self.sites.get(key, 0) + 1

    def _patch(self, owner, name, wrap):
        orig = getattr(owner, name)
        self.saved.append((owner, name, orig))
        setattr(owner, name, wrap(orig))

    def __enter__(self):
        def d2h(orig):
            def f(t, *a, **k):
                if _from_project():
                    self.d2h += 1
                    self._site()
                return orig(t, *a, **k)
            return f

        def tensor(orig):
            def f(*a, **k):
                if k.get("device") is not None and _from_project():
                    self.h2d += 1
                    self._site()
                return orig(*a, **k)
            return f

        def to(orig):
            def f(t, *a, **k):
                dev = k.get("device", a[0] if a and isinstance(a[0], (str, torch.device)) else None)
                if dev is not None and not k.get("non_blocking", False) and _from_project():
                    self.h2d += 1
                    self._site()
                return orig(t, *a, **k)
            return f
        for name in self.D2H:
            self._patch(torch.Tensor, name, d2h)
        self._patch(torch, "tensor", tensor)
        self._patch(torch.Tensor, "to", to)
        return self

    def __exit__(self, *exc):
        for owner, name, orig in reversed(self.saved):
            setattr(owner, name, orig)


def count_launches(fn) -> tuple[int, int]:
    """(aten ops, Triton launches) while fn() runs; ops made by triton's interpreter are skipped."""
    from torch.utils._python_dispatch import TorchDispatchMode
    counts = [0, 0]

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            f = sys._getframe(1)
            while f is not None and "torch" + os.sep in f.f_code.co_filename:
                f = f.f_back
            if f is None or "triton" + os.sep not in f.f_code.co_filename:
                counts[0] += 1
            return func(*args, **(kwargs or {}))
    patched = []
    try:
        import triton.runtime.interpreter as interp
        import triton.runtime.jit as jit
        for cls in (jit.JITFunction, interp.InterpretedFunction):
            orig = cls.run
            patched.append((cls, orig))

            def run(self, *a, _orig=orig, **k):
                counts[1] += 1
                with torch.utils._python_dispatch._disable_current_modes():
                    return _orig(self, *a, **k)
            cls.run = run
    except ImportError:
        pass
    try:
        with Ops():
            fn()
    finally:
        for cls, orig in patched:
            cls.run = orig
    return counts[0], counts[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="torch", choices=("torch", "triton"))
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--eplb", action="store_true", help="count EPLB expert loads as the engine does")
    a = ap.parse_args(argv)
    import tempfile
    from engine import LLM, SamplingParams
    from launch.make_checkpoint import make_checkpoint
    path = make_checkpoint(os.path.join(tempfile.mkdtemp(), "t"), "tiny-v3", tokenizer="none")
    llm = LLM(path, attention_backend=a.backend, moe_backend=a.backend, kv_block_size=16, num_kv_blocks=64)
    eng = llm.engine
    if not a.eplb:
        for layer in eng.worker.runner.model.moe_layers():
            layer.expert_load = None
    sp = SamplingParams(temperature=0, max_tokens=a.steps + 3, ignore_eos=True)
    for i in range(a.batch):
        eng.add_request(list(range(3 + i, 20 + i)), sp)
    eng.step()   # prefill
    with HostSyncCounter() as c:
        for _ in range(a.steps):
            eng.step()
    moe = eng.worker.runner.model.moe_layers()[0]
    x = torch.randn(a.batch, llm.model_config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ops, launches = count_launches(lambda: moe(x))
    n_layers = llm.model_config.num_hidden_layers
    n_moe = len(eng.worker.runner.model.moe_layers())
    print(f"backend {a.backend}, batch {a.batch}, {n_layers} layers ({n_moe} MoE), "
          f"eplb counting {'on' if a.eplb else 'off'}")
    print(f"host syncs per decode step: {(c.d2h + c.h2d) / a.steps:.1f} "
          f"(device->host {c.d2h / a.steps:.1f}, blocking host->device {c.h2d / a.steps:.1f})")
    print("  where (per step):", ", ".join(f"{k} x{v / a.steps:g}" for k, v in sorted(c.sites.items())))
    print(f"one MoE layer (decode, {a.batch} tokens): {ops} aten ops + {launches} Triton launches")


if __name__ == "__main__":
    main()
