"""``vqim serve --ray``: the app of ``vqim serve`` (:func:`.serve.build_app`, unchanged) as a Ray
Serve deployment of replicas, and :func:`deployment`, the same for Python users composing their
own Ray apps (``serve.run(deployment(preset="parti-350m", replicas=4))``).

Ray Serve LLM, sgl-router and llm-d front chat and completions only; plain Ray Serve takes any
ASGI app, so each replica runs the whole FastAPI app of ``vqim serve``: every route, field,
limit, error and stream is the same, and Ray's HTTP proxy spreads requests over the replicas.

- **The app is built on the replica.** The deployment's ingress is a builder function
  (``serve.ingress(builder)``), evaluated on each replica after its constructor: nothing
  of the app or the engine is pickled, only the model flags travel.
- **Loading and health.** A replica's constructor loads its engine (in a worker thread), so Ray
  routes no request to a replica still loading (it is ``STARTING``); a load that fails fails the
  constructor, which Ray reports and retries. ``check_health`` (every 10 s) fails once the
  engine's decode loop has stopped or a tensor-parallel rank of the replica has died, and Ray
  replaces the replica.
- **Concurrency.** ``max_ongoing_requests`` is the engine's queue plus its batch
  (``max_queue + max_batch_size``): Ray's default of 5 requests per replica would starve the
  continuous batching a replica does (it decodes ``max_batch_size`` images per step); past the
  queue the engine itself answers 429. The autoscaling form (``replicas=(MIN, MAX)``) aims at
  ``target_ongoing_requests`` per replica, by default the batch size.
- **Resources.** One GPU per replica by default (``num_gpus``; 0 with ``device="cpu"``), one CPU.
  ``tp=N``: a placement group of N bundles on one node (``STRICT_PACK``); the replica is rank 0
  and starts ranks 1..N-1 as actors in the other bundles, which join its process group (NCCL on
  GPUs, gloo on CPUs) and follow its decode loop as ``vqim serve`` under torchrun does.
- Responses carry ``x-vqim-replica``, the Ray replica that drew them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
import threading
import warnings

import ray
from ray import serve
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from .factory import add_model_args, engine_from_args
from .serve import Limits, build_app, serve_flags, warn_if_exposed

APP_NAME = "vqim"
# What this process's replica loaded, for the app's builder: Ray runs one replica per actor
# process and evaluates the builder right after the replica's constructor.
_LOADED: dict = {}


def _take_engine():
    """The engine this process's replica loaded (a module-level function: the builder, which Ray
    pickles by value with copies of the globals it names, reaches the real ``_LOADED`` here)."""
    return _LOADED.pop("engine")


def model_options(**given) -> dict:
    """The model flags of every ``vqim`` command (:func:`.factory.add_model_args`) by their
    argument names (``model``, ``preset``, ``device``, ``dtype``, ``model_seed``, ``compile``,
    ``quantize``, ``cpu_threads``): their defaults, with ``given`` over them."""
    p = argparse.ArgumentParser(add_help=False)
    add_model_args(p)
    options = vars(p.parse_args([]))
    unknown = sorted(set(given) - set(options))
    if unknown:
        raise TypeError(f"unknown model option {unknown[0]!r}; expected among {sorted(options)}")
    options.update(given)
    if options["model"] is not None and options["preset"] is not None:
        raise ValueError("give model or preset, not both")
    return options


def _dist_env(rank: int, world: int, addr: str, port: int) -> None:
    """torchrun's variables for this process, which the engine's tensor parallelism reads."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": "0", "MASTER_ADDR": addr,
                       "MASTER_PORT": str(port)})


def _free_port(addr: str) -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


class TPRank:
    """Rank ``r > 0`` of a tensor-parallel replica: its shard of the engine, whose decode loop
    follows rank 0's until rank 0's engine closes."""

    def run(self, options: dict, engine_options: dict, tp: int, rank: int, addr: str, port: int) -> None:
        _dist_env(rank, tp, addr, port)
        engine = engine_from_args(argparse.Namespace(**options), tp=tp, **engine_options)
        engine.join()


class VQIMReplica:
    """One replica of the deployment: the engine, loaded before the replica takes requests."""

    async def __init__(self, options: dict, engine_options: dict, tp: int, rank_resources: dict):
        self.engine = None
        self._ranks: list = []  # the actors of ranks 1..tp-1 (held: a dropped handle kills its actor)
        self._runs: list = []  # their run() calls, which end only when rank 0's engine closes
        if tp > 1:
            group = ray.util.get_current_placement_group()
            addr = ray.util.get_node_ip_address()
            port = _free_port(addr)
            rank_cls = ray.remote(TPRank)
            for r in range(1, tp):
                actor = rank_cls.options(**rank_resources, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=r)).remote()
                self._ranks.append(actor)
                self._runs.append(actor.run.remote(options, engine_options, tp, r, addr, port))
            _dist_env(0, tp, addr, port)

        def load():
            engine = engine_from_args(argparse.Namespace(**options), tp=tp, **engine_options)
            engine.cfg.require_decoder("vqim serve")
            return engine

        loading = asyncio.ensure_future(asyncio.to_thread(load))
        ranks = [asyncio.wrap_future(ref.future()) for ref in self._runs]
        while not loading.done():
            done, _ = await asyncio.wait([loading, *ranks], return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                if fut is not loading:
                    fut.result()  # a rank's failure, raised here
                    raise RuntimeError("a tensor-parallel rank of this replica stopped while the model loaded")
        self.engine = loading.result()
        _LOADED["engine"] = self.engine

    async def check_health(self) -> None:
        """Fails (Ray then replaces the replica) once the engine cannot draw: its decode loop has
        stopped, or one of its tensor-parallel ranks has."""
        if self._runs:
            ended, _ = ray.wait(self._runs, num_returns=1, timeout=0)
            if ended:
                ray.get(ended[0])
                raise RuntimeError("a tensor-parallel rank of this replica stopped")
        loop = getattr(self.engine, "_scheduler", None)
        if loop is not None and getattr(loop, "_closed", False):
            raise RuntimeError("the engine's decode loop has stopped (a failure outside any one request)")


class _ReplicaHeader:
    """ASGI middleware: ``x-vqim-replica: <Ray replica id>`` on every HTTP response."""

    def __init__(self, app, replica: str):
        self.app = app
        self._header = (b"x-vqim-replica", replica.encode())

    def __getattr__(self, name):
        return getattr(self.app, name)  # Ray reads the app's own attributes (exception handlers, docs)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self._header]}
            await send(message)

        await self.app(scope, receive, tagged)


def _builder(limits: Limits, api_key: str | None, model_names: tuple[str, ...] | None):
    """The ingress's builder function, evaluated on each replica after its constructor."""

    def build_replica_app():
        engine = _take_engine()
        extra = {} if model_names is None else {"model_names": model_names}
        app = build_app(lambda: engine, limits=limits, api_key=api_key, **extra)
        return _ReplicaHeader(app, serve.get_replica_context().replica_id.unique_id)

    return build_replica_app


def _gpus(num_gpus: float | None, device: str | None) -> float:
    """GPUs per replica (per rank): one by default, none for a CPU engine."""
    if num_gpus is None:
        return 0.0 if (device or "").startswith("cpu") else 1.0
    if not num_gpus >= 0:
        raise ValueError(f"num_gpus must be >= 0, got {num_gpus}")
    return float(num_gpus)


def deployment(*, replicas: int | tuple[int, int] = 1, target_ongoing_requests: float | None = None,
               num_gpus: float | None = None, num_cpus: float = 1.0, tp: int = 1, limits: Limits | None = None,
               api_key: str | None = None, model_names: tuple[str, ...] | None = None, max_queue: int = 1024,
               max_batch_size: int = 16, name: str = "vqim", **model) -> serve.Application:
    """A Ray Serve application of ``vqim serve``'s app: ``serve.run(deployment(...), route_prefix="/")``.

    ``model``: the model flags by argument name (:func:`model_options`: ``model=DIR`` or
    ``preset=NAME``, ``device``, ``dtype``, ...; neither model nor preset: the bundled model).
    ``replicas``: N, or ``(MIN, MAX)`` for Ray Serve's autoscaling around
    ``target_ongoing_requests`` per replica (default ``max_batch_size``). ``num_gpus`` /
    ``num_cpus`` per replica and per tensor-parallel rank (GPUs default to one, none with
    ``device="cpu"``); ``tp``: ranks per replica, in a placement group of ``tp`` bundles on one
    node. ``limits``, ``api_key``, ``model_names``: as :func:`.serve.build_app` takes them;
    ``max_queue`` and ``max_batch_size``: the engine's.
    """
    options = model_options(**model)
    limits = Limits() if limits is None else limits
    for flag, v in (("max_queue", max_queue), ("max_batch_size", max_batch_size), ("tp", tp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{flag} must be an int >= 1, got {v!r}")
    if not num_cpus > 0:
        raise ValueError(f"num_cpus must be > 0, got {num_cpus}")
    gpus = _gpus(num_gpus, options["device"])
    resources = {"num_cpus": float(num_cpus), "num_gpus": gpus}
    config: dict = {"name": name, "max_ongoing_requests": max_queue + max_batch_size,
                    "ray_actor_options": dict(resources)}
    if isinstance(replicas, tuple):
        lo, hi = replicas
        if not 0 <= lo <= hi or hi < 1:
            raise ValueError(f"replicas (MIN, MAX) needs 0 <= MIN <= MAX and MAX >= 1, got {replicas}")
        target = max_batch_size if target_ongoing_requests is None else target_ongoing_requests
        if not target > 0:
            raise ValueError(f"target_ongoing_requests must be > 0, got {target}")
        config["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                        "target_ongoing_requests": target}
    else:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1 or (MIN, MAX), got {replicas!r}")
        if target_ongoing_requests is not None:
            raise ValueError("target_ongoing_requests is for autoscaling: give replicas as (MIN, MAX)")
        config["num_replicas"] = replicas
    if tp > 1:
        bundle = {"CPU": float(num_cpus), **({"GPU": gpus} if gpus else {})}
        config["placement_group_bundles"] = [dict(bundle) for _ in range(tp)]
        config["placement_group_strategy"] = "STRICT_PACK"
    names = None if model_names is None else tuple(model_names)
    ingress = serve.ingress(_builder(limits, api_key, names))(VQIMReplica)
    dep = serve.deployment(ingress, **config)
    return dep.bind(options, {"max_queue": max_queue, "max_batch_size": max_batch_size}, tp, resources)


# ---------------------------------------------------------------------------------- the command


def main(args: argparse.Namespace) -> None:
    """``vqim serve --ray``: deploy on the Ray cluster (``--ray-address``, else ``$RAY_ADDRESS``,
    else a local one), serve on ``--host:--port`` until SIGINT/SIGTERM, then delete the app (a
    local cluster this command started stops with it)."""
    limits, names, api_key = serve_flags(args)
    names = names or None
    if args.tp < 1:
        raise ValueError(f"--tp must be >= 1, got {args.tp}")
    if "RANK" in os.environ:
        raise ValueError("vqim serve --ray starts a replica's tensor-parallel ranks as Ray actors (--tp N): run it "
                         "once, not under torchrun")
    if args.target_ongoing_requests is not None and not isinstance(args.replicas, tuple):
        raise ValueError("--target-ongoing-requests is for autoscaling: give --replicas MIN:MAX")
    options = {k: getattr(args, k) for k in model_options()}
    app = deployment(replicas=args.replicas, target_ongoing_requests=args.target_ongoing_requests,
                     num_gpus=args.num_gpus, num_cpus=args.num_cpus, tp=args.tp, limits=limits, api_key=api_key,
                     model_names=names, max_queue=args.max_queue, max_batch_size=args.max_batch_size, **options)
    warn_if_exposed(args.host, api_key)
    port = args.port or _free_port(args.host)
    stop, ready = threading.Event(), threading.Event()

    def on_signal(*_):
        stop.set()
        if not ready.is_set():
            raise KeyboardInterrupt  # out of serve.run, which waits for the replicas

    ray.init(address=args.ray_address)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)  # after ray.init, whose own handlers log a stack trace
    try:
        gpus = _gpus(args.num_gpus, args.device)
        if gpus and not ray.cluster_resources().get("GPU", 0):
            raise ValueError(f"the Ray cluster has no GPU for --num-gpus {gpus:g} per replica: give --device cpu (or "
                             "--num-gpus 0) to serve on CPUs")
        serve.start(http_options={"host": args.host, "port": port})
        host, port = _http_address(args.host, port)
        print(f"vqim serve --ray: starting {args.replicas} replica(s) (tp {args.tp}); the app answers at "
              f"http://{host}:{port} once they are ready", file=sys.stderr, flush=True)
        serve.run(app, name=APP_NAME, route_prefix="/")
        ready.set()
        print(f"vqim serve --ray: ready at http://{host}:{port}", file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass  # stopped while the replicas started
    finally:
        _delete_app()
        ray.shutdown()


def _http_address(host: str, port: int) -> tuple[str, int]:
    """Where Ray Serve's proxies listen: ``host:port``, unless Serve already ran on the cluster
    with other HTTP options, which Ray keeps (then a warning says so)."""
    try:
        from ray.serve.context import _get_global_client  # not public: read only, with a fallback

        config = _get_global_client().http_config
        have = (config.host, int(config.port))
    except Exception:  # noqa: BLE001 (another Ray version: trust the options given)
        return host, port
    if have != (host, port):
        warnings.warn(f"Ray Serve already runs on this cluster with its proxies on {have[0]}:{have[1]}; --host and "
                      "--port do not change that (the app answers there)", stacklevel=2)
    return have


# How long the command waits for Ray to delete its app when it stops.
DELETE_TIMEOUT_S = 60.0


def _delete_app() -> None:
    """Delete this command's app, waiting at most DELETE_TIMEOUT_S: a cluster that went away
    under it (its raylet killed) would leave ``serve.delete`` waiting forever."""
    done = threading.Event()

    def delete():
        try:
            serve.delete(APP_NAME)
        except Exception as e:  # noqa: BLE001 (told, then the command still leaves the cluster)
            print(f"vqim serve --ray: could not delete the app: {e}", file=sys.stderr)
        finally:
            done.set()

    threading.Thread(target=delete, name="vqim-ray-delete", daemon=True).start()
    if not done.wait(DELETE_TIMEOUT_S):
        print(f"vqim serve --ray: the Ray cluster did not delete the app within {DELETE_TIMEOUT_S:g} s; leaving it",
              file=sys.stderr)
