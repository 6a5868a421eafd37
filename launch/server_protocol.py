"""OpenAI/vLLM wire format: request fields -> engine choices, chat templates, response bodies.

Unknown request fields are accepted and ignored (clients send many); known ones are type-checked
here so that a bad value is a 400 naming its field before any work starts. Known OpenAI fields this
engine does not implement (logprobs, echo, penalties, ...) are a 400 unless they hold their no-op
value: ignoring them would hand the client a silently different answer.
"""
import json
import os
import random
import time
import uuid

from engine import SamplingParams


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error",
                              404: "not_found_error", 503: "service_unavailable"}.get(status, "server_error")
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


def bad(message, param=None):
    return ApiError(400, message, param)


# ---- field checks ------------------------------------------------------------------------------
def _num(body, key, default, lo=None, hi=None, integer=False):
    v = body.get(key, default)
    if v is None:
        return default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise bad(f"'{key}' must be {'an integer' if integer else 'a number'}, got {json.dumps(v)}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise bad(f"'{key}' must be in [{lo}, {hi}], got {v}".replace("None", "inf"), key)
    return v


def _bool(body, key, default=False):
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(f"'{key}' must be a boolean, got {json.dumps(v)}", key)
    return v


def _str_list(body, key):
    v = body.get(key)
    if v is None:
        return []
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) and s for s in v):
        raise bad(f"'{key}' must be a non-empty string or a list of them", key)
    return v


def _ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(t, int) and not isinstance(t, bool) for t in v)


def parse_prompts(body) -> list:
    """'prompt': text, token ids, or a list of either -> list of str | list[int]."""
    p = body.get("prompt")
    if isinstance(p, str):
        return [p]
    if _ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) or _ids(x) for x in p):
        return p
    raise bad("'prompt' must be a string, a list of token ids, or a non-empty list of either", "prompt")


# fields of the OpenAI API the engine does not implement, with the values that ask for nothing
# (absent and null always do)
UNSUPPORTED = {"logprobs": (False, 0), "top_logprobs": (0,), "echo": (False,), "best_of": (1,),
               "logit_bias": ({},), "suffix": ("",), "presence_penalty": (0,), "frequency_penalty": (0,),
               "repetition_penalty": (1,), "tools": ([],), "response_format": ({"type": "text"},),
               "guided_json": (), "guided_regex": (), "guided_choice": ()}


def refuse_unsupported(body) -> None:
    for key, noop in UNSUPPORTED.items():
        v = body.get(key)
        if v is not None and not any(v == x and isinstance(v, bool) == isinstance(x, bool) for x in noop):
            raise bad(f"'{key}' is not supported by this server (got {json.dumps(v)})", key)


def sampling(body, *, max_tokens_default, chat: bool) -> tuple[SamplingParams, int]:
    """-> (params for the first choice, n). Ranges follow vLLM; SamplingParams checks the rest."""
    refuse_unsupported(body)
    keys = ("max_completion_tokens", "max_tokens") if chat else ("max_tokens",)
    max_tokens = None
    for k in keys:
        if body.get(k) is not None:
            max_tokens = _num(body, k, None, lo=1, integer=True)
            break
    top_k = _num(body, "top_k", -1, integer=True)
    n = _num(body, "n", 1, lo=1, hi=128, integer=True)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad("'user' must be a string", "user")
    stop_ids = body.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(type(t) is int for t in stop_ids):
        raise bad("'stop_token_ids' must be a list of integers", "stop_token_ids")
    try:
        params = SamplingParams(
            temperature=float(_num(body, "temperature", 1.0, lo=0, hi=2)),
            top_p=float(_num(body, "top_p", 1.0)), top_k=-1 if top_k == 0 else top_k,
            min_p=float(_num(body, "min_p", 0.0)), max_tokens=max_tokens or max_tokens_default,
            ignore_eos=_bool(body, "ignore_eos"), stop=_str_list(body, "stop"), stop_token_ids=stop_ids,
            seed=_num(body, "seed", None, integer=True), priority=_num(body, "priority", 0, integer=True),
            session_id=user, n=n)
    except ValueError as e:
        msg = str(e)
        param = next((k for k in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stop")
                      if k in msg), None)
        raise bad(msg, param) from None
    return params, n


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """n independent requests; with a seed, choice j draws with seed + j (reproducible), without one
    each gets a fresh random seed so the n samples differ."""
    if n == 1:
        return [params]
    out = []
    for j in range(n):
        seed = params.seed + j if params.seed is not None else random.randrange(1 << 62)
        out.append(SamplingParams(**{**params.__dict__, "seed": seed, "n": 1}))
    return out


def stream_options(body) -> bool:
    so = body.get("stream_options")
    if so is None:
        return False
    if not isinstance(so, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    return _bool(so, "include_usage")


# ---- chat ----------------------------------------------------------------------------------------
class ChatTemplate:
    """tokenizer_config.json's `chat_template`, rendered with jinja2 the way transformers does
    (sandboxed, trim_blocks, lstrip_blocks, loop controls, `raise_exception`)."""

    def __init__(self, model_dir: str):
        self.template, self.special = None, {}
        path = os.path.join(model_dir, "tokenizer_config.json")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            tc = json.load(f)
        tpl = tc.get("chat_template")
        if isinstance(tpl, list):   # [{name, template}, ...]: the default one
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        for k in ("bos_token", "eos_token", "unk_token", "pad_token"):
            v = tc.get(k)
            self.special[k] = v.get("content") if isinstance(v, dict) else v
        if tpl:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg):
                raise bad(f"chat template: {msg}", "messages")
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=[loopcontrols])
            env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
            env.globals["raise_exception"] = raise_exception
            self.template = env.from_string(tpl)

    def render(self, messages, add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise bad("this model has no chat template (tokenizer_config.json 'chat_template'): "
                      "use /v1/completions", "messages")
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    **self.special)


def parse_messages(body) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string 'role'", "messages")
        c = m.get("content")
        if isinstance(c, list):   # content parts: only text is understood here
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in c):
                raise bad(f"messages[{i}].content: only text parts are supported", "messages")
            c = "".join(p["text"] for p in c)
        if c is None:
            c = ""
        if not isinstance(c, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({**m, "content": c})
    return out


# ---- responses -----------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int, cached: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def now_s() -> int:
    return int(time.time())
