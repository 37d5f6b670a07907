"""Plans train and evaluate in a child process with operating-system limits: defence in depth
behind the verifier, so that a verifier miss cannot become the host's problem.

One child per worker, started (``multiprocessing`` *spawn*: a fresh interpreter, none of the
parent's threads, sockets or memory) at the first plan task and reused while it lives. The
child receives the local data once, then per task the verified program (it verifies and
builds it again itself, cached by hash), the weights and the training config; it answers
with the trained state and its metrics. Before the first task it locks itself down:

* ``RLIMIT_AS``: its address space may grow by at most ``memory_bytes`` beyond what it had
  once torch was imported (allocations past it fail inside the child; the child reports the
  failure and exits);
* ``RLIMIT_CPU``: before each task the soft limit is set to the CPU time used so far plus
  ``cpu_seconds``; the kernel kills the child with ``SIGXCPU`` past it. The hard limit is
  fixed at start to 100 tasks' worth: code that took over the child could raise the soft
  limit up to it, no further; a child whose budget runs low is replaced;
* ``PR_SET_NO_NEW_PRIVS``: no set-uid or file-capability gains through ``execve``;
* seccomp (with ``pyseccomp`` over the system's libseccomp, when both load): ``socket``,
  ``execve``, ``execveat`` and ``ptrace`` fail with ``EPERM``. Without them the child runs
  with the other limits and says so in the worker's log: no claim is made for it.

What the child sends back is untrusted: raw bytes (never unpickled) that the parent decodes
with fedcore's typed codec against the signature it expects (names, dtypes, shapes, size),
checks for finite values, and whose metrics it reads as JSON numbers under known keys. The
parent's own data and requests go to the child pickled (it is the parent's trusted input).

A child that dies (a limit, a crash) fails only the task it ran: the worker reports a
:class:`~fedcore.errors.TrainingFailed` naming the limit and starts a fresh child for the
next plan task. Not enforced: a file-system view (the child can read what the worker's user
can), wall-clock time (the parent waits ``cpu_seconds`` x 4 + 60 s, then kills the child),
GPU memory (the sandbox runs on the CPU only).
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import math
import multiprocessing
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any

import numpy as np
import torch

from fedcore.codec import header_signature, iter_chunks, make_header, weights_from_header_and_chunks
from fedcore.errors import PayloadError, TrainingFailed
from fedcore.plan import TrainConfig
from fedcore.v1 import fedcore_pb2 as pb
from fedcore.weights import ModelSignature, Weights, describe_mismatch, total_bytes

__all__ = ["PlanSandbox", "SandboxLimits", "SandboxResult", "lock_down"]

log = logging.getLogger("fedcore.worker")

_PR_SET_NO_NEW_PRIVS = 38
_LIFETIME_TASKS = 100
_DENIED_SYSCALLS = ("socket", "execve", "execveat", "ptrace")
_METRICS = frozenset({"loss", "accuracy", "train_seconds", "num_examples"})
_MAX_MESSAGE = 64 * 1024


@dataclass(frozen=True)
class SandboxLimits:
    """What a plan's child may use: address space beyond its idle size, CPU time per task."""

    memory_bytes: int
    cpu_seconds: int


@dataclass(frozen=True)
class SandboxResult:
    """A task's outcome from the child, decoded and checked."""

    weights: Weights  # the trained state (fit); empty for evaluation
    num_examples: int
    metrics: dict[str, float]


# ------------------------------------------------------------------ the child


def _vm_size() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _cpu_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def lock_down(limits: SandboxLimits) -> list[str]:
    """Apply the limits to this process (the child); returns what could not be enforced."""
    missing: list[str] = []
    address_space = _vm_size() + limits.memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
    hard = math.ceil(_cpu_used()) + limits.cpu_seconds * _LIFETIME_TASKS
    resource.setrlimit(resource.RLIMIT_CPU, (hard, hard))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        missing.append(f"no-new-privileges (prctl: {os.strerror(ctypes.get_errno())})")
    try:
        import pyseccomp  # type: ignore[import-untyped]  # no type hints shipped

        rules = pyseccomp.SyscallFilter(defaction=pyseccomp.ALLOW)
        for name in _DENIED_SYSCALLS:
            rules.add_rule(pyseccomp.ERRNO(errno.EPERM), name)
        rules.load()
    except Exception as exc:  # no binding, no libseccomp, a kernel without seccomp
        missing.append(f"seccomp ({type(exc).__name__}: {exc})")
    return missing


def _reply(conn: Connection, kind: str, **body: Any) -> None:
    conn.send_bytes(json.dumps({"kind": kind, **body}).encode())


def _child_main(
    conn: Connection,
    data_arrays: tuple[np.ndarray, np.ndarray],
    eval_arrays: tuple[np.ndarray, np.ndarray] | None,
    limits: SandboxLimits,
    threads: int,
) -> None:
    """The child's loop: lock down, then run tasks until the parent closes the pipe."""
    from fedcore.data.shards import ArrayDataset
    from fedcore.models import get_weights, set_weights
    from fedcore.plans import verify_program
    from fedcore.training import evaluate, train, warm_up

    from .plans import plan_state, read_only_input

    torch.set_num_threads(threads)
    warm_up()  # torch's lazy imports, before the address-space limit
    data = ArrayDataset(*data_arrays, source="sandbox")
    eval_data = data if eval_arrays is None else ArrayDataset(*eval_arrays, source="sandbox")
    del data_arrays, eval_arrays
    missing = lock_down(limits)
    _reply(conn, "ready", missing=missing)
    modules: dict[str, tuple[torch.nn.Module, Any]] = {}
    while True:
        try:
            request = conn.recv()
        except EOFError:
            return
        try:
            soft = math.ceil(_cpu_used()) + limits.cpu_seconds
            _, hard = resource.getrlimit(resource.RLIMIT_CPU)
            resource.setrlimit(resource.RLIMIT_CPU, (min(soft, hard), hard))
            program = pb.PlanProgram.FromString(request["program"])
            if program.hash not in modules:
                verified = verify_program(program)
                modules.clear()  # one plan at a time
                modules[program.hash] = (
                    read_only_input(verified.build()),
                    plan_state(verified, request["accept"]),
                )
            module, state = modules[program.hash]
            set_weights(module, request["weights"])
            state.reset(module)
            if request["kind"] == "fit":
                config: TrainConfig = request["config"]
                for _, parameter in module.named_parameters():
                    parameter.requires_grad_(True)
                result = train(module, data, config)
                trained = get_weights(module)
                size = max(1, sum(a.nbytes for a in trained.values()))
                metrics = {
                    "loss": result.loss,
                    "accuracy": result.accuracy,
                    "train_seconds": result.seconds,
                    "num_examples": result.num_examples,
                }
                _reply(conn, "done", metrics=metrics)
                conn.send_bytes(make_header(trained, size).SerializeToString())
                conn.send_bytes(b"".join(iter_chunks(trained, size)))
            else:
                ev = evaluate(module, eval_data)
                metrics = {
                    "loss": ev.loss,
                    "accuracy": ev.accuracy,
                    "num_examples": ev.num_examples,
                }
                _reply(conn, "done", metrics=metrics)
        except MemoryError:
            _reply(conn, "failed", reason="memory")
            return
        except RuntimeError as exc:
            # torch reports a failed allocation as a RuntimeError naming the allocator.
            memory = "alloc" in str(exc).lower() or "memory" in str(exc).lower()
            _reply(conn, "failed", reason="memory" if memory else f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:
            _reply(conn, "failed", reason=f"{type(exc).__name__}: {exc}")
            return


# ------------------------------------------------------------------ the parent


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TrainingFailed(
            f"the plan's sandbox sent a metric that is not a number: {value!r:.40}"
        )
    return float(value)


def _arrays(data: tuple[torch.Tensor, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
    # Views of the worker's tensors: pickling them for the child copies their bytes.
    return data[0].detach().cpu().numpy(), data[1].detach().cpu().numpy()


class PlanSandbox:
    """The parent's side: one child at a time, restarted after it dies.

    Args:
        limits: the child's limits.
        data: the local training data as tensors (x, y), copied to the child at its start.
        eval_data: the evaluation data, when it is not the training data.
        accept: the buffer kinds the policy accepts (the child's reset uses the same state).
    """

    def __init__(
        self,
        limits: SandboxLimits,
        data: tuple[torch.Tensor, torch.Tensor],
        eval_data: tuple[torch.Tensor, torch.Tensor] | None,
        accept: tuple[str, ...],
    ) -> None:
        self.limits = limits
        self.accept = accept
        # What travels to each child: numpy arrays, by value (a pickled torch tensor would
        # travel as shared memory, which the child could write into).
        self._data = _arrays(data)
        self._eval = _arrays(eval_data) if eval_data is not None else None
        self._examples = max(len(self._data[1]), len(self._eval[1]) if self._eval else 0)
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None
        self._tasks = 0
        self._lock = threading.Lock()
        self.enforced: list[str] = []

    # -- lifecycle

    def _start(self) -> Connection:
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe(duplex=True)
        process = context.Process(
            target=_child_main,
            args=(child, self._data, self._eval, self.limits, torch.get_num_threads()),
            name="fedcore-plan-sandbox",
            daemon=True,
        )
        process.start()
        child.close()
        self._process, self._conn, self._tasks = process, parent, 0
        ready = self._message(parent, timeout=600.0)
        if ready.get("kind") != "ready":
            raise self._died("while starting")
        missing = [str(m)[:200] for m in ready.get("missing", [])][:4]
        if missing:
            log.warning("plan sandbox: not enforced here: %s", "; ".join(missing))
        self.enforced = [
            f"address space +{self.limits.memory_bytes:,} bytes",
            f"CPU {self.limits.cpu_seconds} s per task",
        ] + [
            name
            for name in ("no-new-privileges", "seccomp")
            if not any(m.startswith(name) for m in missing)
        ]
        log.info("plan sandbox started (pid %d): %s", process.pid, ", ".join(self.enforced))
        return parent

    def close(self) -> None:
        """Stop the child (it exits when its pipe closes; killed if it does not)."""
        with self._lock:
            self._stop()

    def _stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join(timeout=5)
        self._process, self._conn = None, None

    def _died(self, when: str) -> TrainingFailed:
        process = self._process
        code = None
        if process is not None:
            process.join(timeout=10)
            code = process.exitcode
        self._stop()
        if code == -signal.SIGXCPU:
            what = f"it ran past its CPU-time limit ({self.limits.cpu_seconds} s per task)"
        elif when == "timeout":
            what = "it did not answer in time and was killed"
        elif code is not None and code < 0:
            what = f"it was killed by signal {signal.Signals(-code).name}"
        else:
            what = f"it exited (code {code})"
        return TrainingFailed(f"the plan's sandbox stopped {when}: {what}; the task failed")

    def _wait(self, conn: Connection, timeout: float) -> None:
        """Wait for the child's next message; raise if it dies or does not answer in time.
        Its liveness is checked every second: a child that dies before it took its end of
        the pipe leaves that end open in the parent, and the pipe alone would never say so."""
        deadline = time.monotonic() + timeout
        while not conn.poll(1.0):
            if self._process is None or not self._process.is_alive():
                raise self._died("during the task")
            if time.monotonic() > deadline:
                self._process.kill()
                raise self._died("timeout")

    def _message(self, conn: Connection, timeout: float) -> dict[str, Any]:
        self._wait(conn, timeout)
        try:
            raw = conn.recv_bytes(_MAX_MESSAGE)
            message = json.loads(raw)
        except (EOFError, OSError):
            raise self._died("during the task") from None
        except ValueError:
            self._stop()
            raise TrainingFailed("the plan's sandbox sent a malformed message") from None
        if not isinstance(message, dict):
            self._stop()
            raise TrainingFailed("the plan's sandbox sent a malformed message")
        return message

    # -- tasks

    def run(
        self,
        program: pb.PlanProgram,
        weights: Weights,
        config: TrainConfig | None,
        signature: ModelSignature,
    ) -> SandboxResult:
        """Train (``config`` given) or evaluate ``program`` from ``weights`` in the child.

        Raises:
            TrainingFailed: the child failed, hit a limit, or sent something unexpected.
        """
        with self._lock:
            if self._conn is None or self._tasks >= _LIFETIME_TASKS - 1:
                self._stop()
                self._start()
            conn = self._conn
            assert conn is not None
            self._tasks += 1
            request = {
                "kind": "fit" if config is not None else "evaluate",
                "program": program.SerializeToString(),
                "accept": self.accept,
                "weights": weights,
                "config": config,
            }
            try:
                conn.send(request)
            except (OSError, ValueError):
                raise self._died("before the task") from None
            timeout = self.limits.cpu_seconds * 4 + 60.0
            result = self._result(self._message(conn, timeout))
            if config is None:
                return result
            return replace(result, weights=self._receive_weights(conn, timeout, signature))

    def _receive_weights(
        self, conn: Connection, timeout: float, signature: ModelSignature
    ) -> Weights:
        expected = total_bytes(signature)
        first = self._raw(conn, timeout, _MAX_MESSAGE + 1024 * len(signature))
        try:
            header = pb.PayloadHeader.FromString(first)
            problem = describe_mismatch(
                tuple(sorted(signature, key=lambda t: t.name)),
                tuple(sorted(header_signature(header), key=lambda t: t.name)),
            )
        except Exception as exc:  # protobuf's DecodeError, a bad header
            self._stop()
            raise TrainingFailed(f"the plan's sandbox sent a malformed header: {exc}") from None
        if problem is not None:
            self._stop()
            raise TrainingFailed(f"the plan's sandbox sent other state than the plan's: {problem}")
        data = self._raw(conn, timeout, expected)
        try:
            decoded = weights_from_header_and_chunks(header, [data], max_bytes=expected)
        except PayloadError as exc:
            self._stop()
            raise TrainingFailed(f"the plan's sandbox sent a malformed payload: {exc}") from None
        for name, array in decoded.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise TrainingFailed(f"training produced NaN/Inf in {name!r}")
        return decoded

    def _raw(self, conn: Connection, timeout: float, limit: int) -> bytes:
        self._wait(conn, timeout)
        try:
            return conn.recv_bytes(max(limit, 1))
        except (EOFError, OSError):
            raise self._died("during the task") from None

    def _result(self, reply: dict[str, Any]) -> SandboxResult:
        if reply.get("kind") == "failed":
            self._stop()
            reason = str(reply.get("reason", ""))[:200]
            if reason == "memory":
                raise TrainingFailed(
                    f"the plan ran out of its sandbox's memory limit "
                    f"({self.limits.memory_bytes:,} bytes of address space); the task failed"
                )
            raise TrainingFailed(f"the plan failed in its sandbox: {reason!r}")
        metrics = reply.get("metrics")
        if reply.get("kind") != "done" or not isinstance(metrics, dict):
            self._stop()
            raise TrainingFailed("the plan's sandbox sent a malformed message")
        values = {str(k): _number(v) for k, v in metrics.items() if k in _METRICS}
        examples = values.pop("num_examples", 0.0)
        if not (0 <= examples <= self._examples and examples.is_integer()):
            self._stop()
            raise TrainingFailed("the plan's sandbox sent a bad example count")
        return SandboxResult({}, int(examples), values)
