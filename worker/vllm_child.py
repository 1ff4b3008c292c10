"""The vLLM side of ``worker.vllm_engine.VLLMEngine``: a standalone script run by the Python of the vLLM venv.

vLLM pins its own torch and transformers, so it never shares Slicefleet's environment. This script imports
only the standard library and vllm (never balancer/worker/cluster) and is run by file path::

    runs/vllm-venv/bin/python worker/vllm_child.py --model DIR --max-model-len 2048

It builds vLLM's synchronous engine in this process (``LLMEngine`` with the in-process core client, so one
``step()`` here is one scheduler iteration and one forward) and serves commands, one JSON object per line on
stdin, each answered by one JSON line on stdout:

- ``{"op": "add", "id": str, "prompt": [int], "max_tokens": int, "temperature": float, "top_p": float,
  "seed": int|null, "stop_token_ids": [int], "ignore_eos": bool, "min_tokens": int}`` -> ``{"ok": true}``
- ``{"op": "step"}`` -> ``{"ok": true, "t": seconds, "out": [{"id", "new": [int], "done": bool,
  "reason": str|null, "cached": int|null}], "unfinished": int}`` (``new``: the tokens since the last step)
- ``{"op": "abort", "ids": [str]}`` -> ``{"ok": true}``
- ``{"op": "shutdown"}`` -> ``{"ok": true}``, then the process exits.

The first line it writes is ``{"ok": true, "ready": ...}`` once the engine is built (or ``{"ok": false, ...}``).
A failing command answers ``{"ok": false, "error": ...}`` and the loop goes on. Everything else vLLM, torch
or C code prints goes to stderr: file descriptor 1 is pointed at stderr before vllm is imported, and the
replies go to a private duplicate of the original stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

# Replies travel on a private copy of the original stdout; fd 1 (print, logging handlers, C libraries) goes to
# stderr so that nothing vLLM writes can corrupt the framing.
_REPLY = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)
sys.stdout = sys.stderr


def reply(obj: dict) -> None:
    _REPLY.write(json.dumps(obj, separators=(",", ":")) + "\n")
    _REPLY.flush()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--max-model-len", type=int, required=True)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--block-size", type=int, default=None, help="KV block size (vLLM's CPU default: 128)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--no-enforce-eager", action="store_true", help="allow compilation (slower start)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_engine(args: argparse.Namespace):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    # One process: the engine core runs inside step() instead of behind a socket in another process.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import EngineArgs, LLMEngine

    kwargs = dict(
        model=args.model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_caching=not args.no_prefix_caching,
        enforce_eager=not args.no_enforce_eager,
        skip_tokenizer_init=True,  # token ids in, token ids out
        seed=args.seed,
        disable_log_stats=True,
    )
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return LLMEngine.from_engine_args(EngineArgs(**kwargs))


class Server:
    def __init__(self, engine):
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind

        self.engine = engine
        self.SamplingParams, self.TokensPrompt, self.DELTA = SamplingParams, TokensPrompt, RequestOutputKind.DELTA
        self.reported_cached: set[str] = set()

    def add(self, cmd: dict) -> dict:
        params = self.SamplingParams(
            n=1,
            max_tokens=int(cmd["max_tokens"]),
            min_tokens=int(cmd.get("min_tokens", 0)),
            temperature=float(cmd.get("temperature", 0.0)),
            top_p=float(cmd.get("top_p", 1.0)),
            top_k=int(cmd.get("top_k", 0)),
            min_p=float(cmd.get("min_p", 0.0)),
            repetition_penalty=float(cmd.get("repetition_penalty", 1.0)),
            presence_penalty=float(cmd.get("presence_penalty", 0.0)),
            frequency_penalty=float(cmd.get("frequency_penalty", 0.0)),
            seed=cmd.get("seed"),
            stop_token_ids=list(cmd.get("stop_token_ids") or []),
            ignore_eos=bool(cmd.get("ignore_eos", True)),
            detokenize=False,
            output_kind=self.DELTA,
        )
        self.engine.add_request(cmd["id"], self.TokensPrompt(prompt_token_ids=list(cmd["prompt"])), params)
        return {"ok": True}

    def step(self, cmd: dict) -> dict:
        t0 = time.perf_counter()
        outputs = self.engine.step()
        dt = time.perf_counter() - t0
        out = []
        for o in outputs:
            c = o.outputs[0] if o.outputs else None
            row = {"id": o.request_id, "new": list(c.token_ids) if c is not None else [], "done": bool(o.finished),
                   "reason": c.finish_reason if c is not None else None, "cached": None}
            if o.request_id not in self.reported_cached and o.num_cached_tokens is not None:
                row["cached"] = int(o.num_cached_tokens)
                self.reported_cached.add(o.request_id)
            if o.finished:
                self.reported_cached.discard(o.request_id)
            out.append(row)
        return {"ok": True, "t": dt, "out": out, "unfinished": self.engine.get_num_unfinished_requests()}

    def abort(self, cmd: dict) -> dict:
        ids = list(cmd.get("ids") or [])
        if ids:
            self.engine.abort_request(ids)
        for i in ids:
            self.reported_cached.discard(i)
        return {"ok": True}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    try:
        engine = build_engine(args)
        import vllm

        server = Server(engine)
    except BaseException as e:  # noqa: BLE001 - the parent needs to know why
        traceback.print_exc()
        reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
        return 1
    reply({"ok": True, "ready": True, "version": vllm.__version__, "pid": os.getpid(),
           "start_s": time.perf_counter() - t0, "max_model_len": args.max_model_len})
    handlers = {"add": server.add, "step": server.step, "abort": server.abort}
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        try:
            cmd = json.loads(line)
            op = cmd.get("op")
            if op == "shutdown":
                reply({"ok": True})
                break
            handler = handlers.get(op)
            if handler is None:
                reply({"ok": False, "error": f"unknown op {op!r}"})
                continue
            reply(handler(cmd))
        except Exception as e:  # noqa: BLE001 - answer and keep serving
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
