"""``VLLMEngine``: the continuous engine contract (``worker.protocol.ContinuousEngine``) served by vLLM.

vLLM cannot share Slicefleet's environment (it pins its own torch and transformers), so the engine owns a
child process running ``worker/vllm_child.py`` with the Python of a separate venv (``bash bench/vllm_setup.sh``
builds ``runs/vllm-venv``) and talks to it in JSON lines over the child's stdin/stdout. The child holds vLLM's
synchronous ``LLMEngine``; one :meth:`VLLMEngine.step` is one vLLM scheduler iteration.

Stopping rules are Slicefleet's, not vLLM's: every token the child returns is pushed through the same
``worker.runner.RowState`` the other engines use (EOS, stop ids, budget, trace-mode ``target_len``, the
context limit), so the caller sees exactly what ``ContinuousBatchingEngine`` would report. vLLM is only told
enough to stop at the same token, so that it computes nothing past the end:

- it never applies its own EOS (``ignore_eos``); the request's EOS ids (the model's generation_config ones
  unless the item names them; none for ``eos_token_ids=()``) and its stop ids become vLLM stop ids;
- ``max_tokens`` = the item's budget (``min(max_new_tokens, target_len)`` in trace mode, where vLLM gets no
  stop ids at all), capped by the room left under ``max_model_len``;
- a request's whole history is its prompt. With prefix caching on (the default) a request re-added with its
  history after an abort finds the full KV blocks it had computed still cached, so its history is not
  prefilled again (``stats.cached_tokens``; ``ItemOutput.kv_reused`` when any of it was cached).

Sampling: temperature / top_p as given. With a seed, vLLM seeds one generator per request at ``add``; the
draws are reproducible for the same (seed, history) but, unlike the torch engines, a request sliced into
several ``add`` calls draws differently from an unsliced one (the child is seeded with ``seed`` mixed with the
history length, so successive slices do not replay the same random stream). Greedy runs are
slicing-invariant.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from balancer.types import FinishReason
from worker.continuous import CBStats
from worker.protocol import ItemOutput, SliceItem, run_to_completion
from worker.runner import RowState

log = logging.getLogger(__name__)

ENV_PYTHON = "SLICEFLEET_VLLM_PYTHON"
REPO = Path(__file__).resolve().parents[1]
DEFAULT_VENV_PYTHON = REPO / "runs" / "vllm-venv" / "bin" / "python"
CHILD_SCRIPT = Path(__file__).resolve().with_name("vllm_child.py")
DEFAULT_MAX_MODEL_LEN = 2048


def find_python(python: str | Path | None = None) -> Path:
    """The vLLM venv's interpreter: ``python``, else ``$SLICEFLEET_VLLM_PYTHON``, else ``runs/vllm-venv``, else
    this interpreter when it can import vllm (``pip install slicefleet[vllm]`` on a GPU fleet)."""
    if python is None:
        python = os.environ.get(ENV_PYTHON) or None
    if python is None:
        if DEFAULT_VENV_PYTHON.exists():
            return DEFAULT_VENV_PYTHON
        import importlib.util
        import sys

        if importlib.util.find_spec("vllm") is not None:
            return Path(sys.executable)
        raise FileNotFoundError(
            f"no vLLM Python: {DEFAULT_VENV_PYTHON} does not exist and ${ENV_PYTHON} is not set. Build the "
            f"venv with `bash bench/vllm_setup.sh` (about 3 minutes; or SLICEFLEET_WITH_VLLM=1 scripts/setup.sh), "
            f"or point ${ENV_PYTHON} at a Python that can `import vllm`"
        )
    path = Path(python)
    if not path.exists():
        raise FileNotFoundError(f"vLLM Python {path} does not exist (build it with `bash bench/vllm_setup.sh`)")
    return path


def model_limits(model_path: str | Path) -> tuple[tuple[int, ...], int]:
    """(EOS ids from generation_config.json or config.json, max_position_embeddings) of a model directory."""
    path = Path(model_path)

    def load(name: str) -> dict:
        try:
            return json.loads((path / name).read_text())
        except (OSError, ValueError):
            return {}

    gen, cfg = load("generation_config.json"), load("config.json")
    eos = gen.get("eos_token_id")
    if eos is None:
        eos = cfg.get("eos_token_id")
    ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return ids, int(cfg.get("max_position_embeddings") or DEFAULT_MAX_MODEL_LEN)



def _penalties(item: SliceItem) -> dict:
    """vLLM's own sampling knobs for ``item``. min_tokens counts the whole request's output while vLLM counts
    from this ``add``. Presence and frequency penalties count vLLM's output only, so after a move (the
    history is re-added as prompt) they restart: the one place this backend departs from the torch engines."""
    sp = item.sampling
    return {"top_k": sp.top_k if sp.top_k > 0 else 0, "min_p": sp.min_p, "repetition_penalty": sp.repetition_penalty,
            "presence_penalty": sp.presence_penalty, "frequency_penalty": sp.frequency_penalty,
            "min_tokens": max(0, sp.min_tokens - item.generated)}

@dataclass
class VLLMStats(CBStats):
    """``CBStats`` (so the worker loop reads either engine alike) plus what the child reports."""

    engine_step_times: list[float] = field(default_factory=list)
    """vLLM's own ``step()`` time per step, measured in the child (``decode_step_times`` hold round trips)."""
    prompt_tokens: int = 0
    """History tokens handed to vLLM as prompts."""
    cached_tokens: int = 0
    """Of those, tokens vLLM found in its prefix cache (not prefilled again)."""
    reprefill_tokens: int = 0
    """History tokens of resumed requests (``generated > 0``) that vLLM had to prefill again."""


@dataclass
class _Req:
    row: RowState
    cid: str | None = None
    """The child's id for this request (unique per add), None when it never reached the child."""
    cached: int | None = None


class ChildError(RuntimeError):
    """The vLLM child failed or died; the message ends with the tail of its stderr."""


class _Child:
    """The child process and its JSON-lines channel."""

    def __init__(self, cmd: list[str], env: dict[str, str], startup_timeout: float, log_path: Path | None):
        self._tail: deque[str] = deque(maxlen=60)
        self._log = open(log_path, "a") if log_path else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env, cwd=str(REPO), start_new_session=True)
        self._buf = b""
        self._lock = threading.Lock()
        self._err_thread = threading.Thread(target=self._drain, name="vllm-child-stderr", daemon=True)
        self._err_thread.start()
        try:
            self.hello = self._recv(startup_timeout, what="start")
        except BaseException:
            self.kill()
            raise

    def _drain(self) -> None:
        for raw in iter(self.proc.stderr.readline, b""):
            line = raw.decode(errors="replace").rstrip()
            self._tail.append(line)
            if self._log is not None:
                self._log.write(line + "\n")
                self._log.flush()

    def tail(self) -> str:
        time.sleep(0.2)  # let the drain thread catch the last words of a dying child
        return "\n".join(self._tail)

    def _fail(self, msg: str) -> ChildError:
        return ChildError(f"{msg}\n--- vLLM child stderr (tail) ---\n{self.tail()}")

    def _recv(self, timeout: float | None, what: str) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._buf:
            wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
            if wait <= 0:
                self.kill()
                raise self._fail(f"vLLM child: no answer to {what!r} within {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], wait)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    self.proc.wait(timeout=5)
                    raise self._fail(f"vLLM child exited (code {self.proc.returncode}) during {what!r}")
                self._buf += chunk
            elif self.proc.poll() is not None:
                raise self._fail(f"vLLM child exited (code {self.proc.returncode}) during {what!r}")
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if not msg.get("ok"):
            raise self._fail(f"vLLM child: {what!r} failed: {msg.get('error')}")
        return msg

    def call(self, cmd: dict, timeout: float | None = None) -> dict:
        with self._lock:
            if self.proc.poll() is not None:
                raise self._fail(f"vLLM child is gone (code {self.proc.returncode})")
            try:
                self.proc.stdin.write((json.dumps(cmd, separators=(",", ":")) + "\n").encode())
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError) as e:
                raise self._fail(f"vLLM child: cannot send {cmd.get('op')!r}: {e}") from e
            return self._recv(timeout, cmd.get("op", "?"))

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 10.0) -> None:
        if self.alive():
            try:
                self.call({"op": "shutdown"}, timeout=timeout)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except Exception:  # noqa: BLE001
                pass
        if self._log is not None:
            self._log.close()
            self._log = None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


def _close_child(child: _Child) -> None:
    try:
        child.close()
    except Exception:  # noqa: BLE001 - at exit
        pass


class VLLMEngine:
    """A vLLM engine in a child process behind the continuous contract (``add``/``step``/``abort``)."""

    backend = "vllm"

    def __init__(
        self,
        model_path: str | Path,
        *,
        python: str | Path | None = None,
        max_model_len: int | None = None,
        max_concurrency: int = 16,
        kv_cache_gib: int = 2,
        cpu_bind: str | None = None,
        dtype: str = "float32",
        enable_prefix_caching: bool = True,
        enforce_eager: bool = True,
        max_num_batched_tokens: int | None = None,
        block_size: int | None = None,
        startup_timeout: float = 300.0,
        step_timeout: float | None = 600.0,
        log_path: str | Path | None = None,
        env: dict[str, str] | None = None,
    ):
        """``kv_cache_gib``: ``VLLM_CPU_KVCACHE_SPACE`` (whole GiB). ``cpu_bind``: ``VLLM_CPU_OMP_THREADS_BIND``
        for the child (e.g. ``"0"`` = one thread on core 0; ``None`` keeps the inherited value, vLLM's default
        being every core of the NUMA node). ``log_path``: append the child's stderr there (its last lines are
        kept in memory anyway for error messages). ``block_size``: vLLM's KV block (CPU default 128, multiples
        of 32); prefix caching reuses whole blocks only, so a resumed request prefills again at most
        ``block_size - 1`` tokens of its history."""
        if int(kv_cache_gib) != kv_cache_gib or kv_cache_gib < 1:
            raise ValueError(f"kv_cache_gib must be a whole number of GiB >= 1 (vLLM CPU), got {kv_cache_gib}")
        self.model_path = Path(model_path)
        self.python = find_python(python)
        eos, max_pos = model_limits(self.model_path)
        self._eos = eos
        self.max_model_len = int(max_model_len or min(max_pos, DEFAULT_MAX_MODEL_LEN))
        self.max_concurrency = max_concurrency
        self.step_timeout = step_timeout
        child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
        child_env.update(
            VLLM_CPU_KVCACHE_SPACE=str(int(kv_cache_gib)), VLLM_CPU_NUM_OF_RESERVED_CPU="0", HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
            VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONUNBUFFERED="1",
        )
        if cpu_bind is not None:
            child_env["VLLM_CPU_OMP_THREADS_BIND"] = str(cpu_bind)
        child_env.update(env or {})
        cmd = [str(self.python), str(CHILD_SCRIPT), "--model", str(self.model_path),
               "--max-model-len", str(self.max_model_len), "--dtype", dtype, "--max-num-seqs", str(max_concurrency)]
        if max_num_batched_tokens:
            cmd += ["--max-num-batched-tokens", str(max_num_batched_tokens)]
        if block_size:
            cmd += ["--block-size", str(block_size)]
        if not enable_prefix_caching:
            cmd.append("--no-prefix-caching")
        if not enforce_eager:
            cmd.append("--no-enforce-eager")
        t0 = time.perf_counter()
        self._child = _Child(cmd, child_env, startup_timeout, Path(log_path) if log_path else None)
        self.start_seconds = time.perf_counter() - t0
        self.version = self._child.hello.get("version")
        log.info("vLLM %s child (pid %s) ready in %.1f s", self.version, self._child.proc.pid, self.start_seconds)
        self._finalizer = weakref.finalize(self, _close_child, self._child)
        self._reqs: dict[str, _Req] = {}
        self._by_cid: dict[str, str] = {}
        self._seq = 0
        self.stats = VLLMStats()

    # ---- the continuous contract -----------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    def reset_stats(self) -> None:
        self.stats = VLLMStats()

    def add(self, item: SliceItem) -> None:
        """Admit a request (its whole history is vLLM's prompt). Re-adding an id that is still here replaces it."""
        rid = item.request_id
        if rid in self._reqs:
            log.warning("vLLM engine: request %s added again while still present; replacing it", rid)
            self.abort(rid)
        row = RowState.start(item, self._eos, self.max_model_len)
        req = _Req(row)
        self._reqs[rid] = req
        if row.done:
            return  # nothing to compute: it leaves at the next step
        self._seq += 1
        req.cid = f"{rid}#{self._seq}"
        trace = item.target_len is not None
        stop = () if trace else sorted(set(row.eos) | set(item.stop_token_ids))
        seed = item.sampling.seed
        if seed is not None:
            seed = (int(seed) * 1_000_003 + len(item.token_ids)) % (1 << 63)
        self._child.call({
            "op": "add", "id": req.cid, "prompt": list(item.token_ids),
            "max_tokens": min(item.budget, self.max_model_len - len(item.token_ids)),
            "temperature": float(item.sampling.temperature) if not item.sampling.greedy else 0.0,
            "top_p": float(item.sampling.top_p), "seed": seed, "stop_token_ids": list(stop), "ignore_eos": True,
            **_penalties(item),
        })
        self._by_cid[req.cid] = rid
        self.stats.prompt_tokens += len(item.token_ids)

    def step(self) -> list[ItemOutput]:
        """One vLLM iteration; returns the requests that finished in it with all their tokens since ``add``."""
        finished: list[ItemOutput] = []
        for rid, req in list(self._reqs.items()):
            if req.cid is None and req.row.done:  # finished at add (no budget, no room): no compute
                del self._reqs[rid]
                finished.append(req.row.output())
        if not self._by_cid:
            self.stats.finished += len(finished)
            return finished
        t0 = time.perf_counter()
        reply = self._child.call({"op": "step"}, timeout=self.step_timeout)
        dt = time.perf_counter() - t0
        first = not reply["out"]
        to_abort: list[str] = []
        produced = 0
        for o in reply["out"]:
            rid = self._by_cid.get(o["id"])
            if rid is None:
                continue  # aborted meanwhile
            req = self._reqs[rid]
            row = req.row
            if o.get("cached") is not None and req.cached is None:
                req.cached = int(o["cached"])
                self.stats.cached_tokens += req.cached
                if row.item.generated > 0:
                    self.stats.reprefill_tokens += max(len(row.item.token_ids) - req.cached, 0)
                row.kv_reused = req.cached > 0
            if not row.new and o["new"]:
                first = True
            for tok in o["new"]:
                if row.done:
                    break
                row.push(int(tok))
                produced += 1
            if o["done"] and not row.done:
                # vLLM ended it where our rules did not (it should not happen: both share the limits).
                log.warning("vLLM ended %s (%s) before Slicefleet's rules did", rid, o.get("reason"))
                row.reason = FinishReason.LENGTH
            if row.done:
                if not o["done"]:
                    to_abort.append(req.cid)
                del self._by_cid[req.cid]
                del self._reqs[rid]
                finished.append(row.output())
        if reply.get("unfinished", 1) == 0 and self._by_cid:
            # vLLM holds nothing although we wait on requests: never spin on them.
            for cid, rid in list(self._by_cid.items()):
                log.warning("vLLM lost request %s; finishing it with LENGTH", rid)
                req = self._reqs.pop(rid)
                req.row.reason = FinishReason.LENGTH
                finished.append(req.row.output())
            self._by_cid.clear()
        if to_abort:
            self._child.call({"op": "abort", "ids": to_abort})
        st = self.stats
        st.steps += 1
        st.engine_step_times.append(float(reply.get("t", 0.0)))
        if first:
            st.prefill_steps += 1
            st.prefill_time += dt
        else:
            st.decode_steps += 1
            st.decode_time += dt
            st.decode_step_times.append(dt)
        st.generated_tokens += produced
        st.finished += len(finished)
        st.max_running = max(st.max_running, len(self._by_cid) + len(finished))
        return finished

    def abort(self, request_id: str) -> bool:
        """Stop a waiting or running request now; vLLM frees its blocks (they stay in the prefix cache)."""
        req = self._reqs.pop(request_id, None)
        if req is None:
            return False
        if req.cid is not None and self._by_cid.pop(req.cid, None) is not None:
            self._child.call({"op": "abort", "ids": [req.cid]})
        return True

    def drop(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self.abort(rid)

    def has_work(self) -> bool:
        return bool(self._reqs)

    def produced(self) -> dict[str, list[int]]:
        return {rid: list(r.row.new) for rid, r in self._reqs.items() if not r.row.done}

    @property
    def running(self) -> list[RowState]:
        """The unfinished requests' rows (what ``ContinuousBatchingEngine.running`` offers the worker loop)."""
        return [r.row for r in self._reqs.values() if not r.row.done]

    @property
    def num_running(self) -> int:
        return len(self._by_cid)

    def cached_tokens(self, request_id: str) -> int | None:
        """Prompt tokens vLLM found in its prefix cache for this request (known after its first step)."""
        req = self._reqs.get(request_id)
        return None if req is None else req.cached

    def run(self, items: Iterable[SliceItem]) -> list[ItemOutput]:
        """Convenience: serve ``items`` (all arriving now) to completion; outputs in input order."""
        return run_to_completion(self, items)

    # ---- lifetime ----------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._child.alive()

    def close(self) -> None:
        """Stop the child (idempotent; also runs at interpreter exit and when the engine is collected)."""
        self._reqs.clear()
        self._by_cid.clear()
        self._finalizer()

    def __enter__(self) -> "VLLMEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
