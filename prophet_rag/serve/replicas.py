"""Engine replicas on Ray Serve behind one endpoint: `prophet-rag serve --ray --replicas N`.

Each replica is a Ray Serve deployment replica that loads its own engine and serves the same app as
`prophet-rag serve` (app.py: OpenAI's chat completions, documents, SSE, usage, auth, limits, metrics). Ray Serve's
HTTP proxy is the one endpoint and routes each request to a replica (the less loaded of two picked at random).

Tiers: every replica keeps its own memory tiers and its own disk store, `<store>/replica-<local rank>` (the rank of
the replica on its node: stable across restarts, so a replacement finds its predecessor's disk), and all share the
Redis/Valkey tier of `StoreConfig.remote_url`, which needs the same store key on every replica. So a document that
one replica has computed (an answer, or an ingest through it) is a remote hit for the others. Each response names
the replica that answered: `X-Prophet-Replica` (its id) and `X-Prophet-Replica-Rank` (`<node rank>.<local rank>`).
Deploying again (another number of replicas, other settings) replaces every replica: Ray Serve restarts replicas
whenever an application deployed from Python is deployed anew; autoscaling adds and removes replicas without that.

Admission: a replica takes `max_in_flight + max_queue` requests (Ray's `max_ongoing_requests`), its own scheduler
runs `max_in_flight` of them and queues the rest; past that Ray's router holds up to `max_queue` more per replica,
then answers 503. A replica that dies fails the requests it held with a 5xx from the proxy, which
`ProphetClient` treats as retryable (the retry goes to a live replica); the others go on.

Autoscaling: with `max_replicas`, Ray Serve keeps between `replicas` and `max_replicas` replicas, aiming at
`max_in_flight` ongoing requests per replica (`target_ongoing_requests`), so a queue building up adds a replica.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ray import serve

from prophet_rag.config import StoreConfig
from prophet_rag.errors import InvalidRequestError, ProphetRAGError
from prophet_rag.serve.config import ReplicaSpec

APP_NAME = "prophet-rag"
REPLICA_HEADER, RANK_HEADER = "X-Prophet-Replica", "X-Prophet-Replica-Rank"


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and what each reserves. `max_replicas` (> `replicas`) turns on autoscaling."""

    replicas: int = 1
    max_replicas: int | None = None
    cpus_per_replica: float = 1.0
    gpus_per_replica: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise InvalidRequestError(f"--replicas must be a whole number >= 1, got {self.replicas!r}.")
        if self.max_replicas is not None and (not isinstance(self.max_replicas, int)
                                              or self.max_replicas <= self.replicas):
            raise InvalidRequestError(f"--max-replicas must be more than --replicas ({self.replicas}), got "
                                      f"{self.max_replicas!r}; leave it out for a fixed number of replicas.")
        if not self.cpus_per_replica > 0 or self.gpus_per_replica < 0:
            raise InvalidRequestError("--cpus-per-replica must be > 0 and --gpus-per-replica >= 0.")


def replica_store(store: StoreConfig, local_rank: int) -> StoreConfig:
    """The store of the replica of `local_rank` on its node: its own disk directory, the shared remote tier."""
    return replace(store, directory=Path(store.directory) / f"replica-{local_rank}")


class EngineReplica:
    """One replica: its engine, loaded once, and the server's app over it."""

    def __init__(self, spec: ReplicaSpec) -> None:
        context = serve.get_replica_context()
        self.replica_id, self.rank = context.replica_id.unique_id, context.rank
        self.spec = spec
        self.engine = spec.build_engine(replica_store(spec.store, self.rank.local_rank))

    def __serve_build_asgi_app__(self):
        from prophet_rag.serve.app import create_app, name_responses

        app = create_app(self.engine, self.spec.serve)
        name_responses(app, {REPLICA_HEADER: self.replica_id,
                             RANK_HEADER: f"{self.rank.node_rank}.{self.rank.local_rank}"})
        return app

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


def application(spec: ReplicaSpec, scaling: Scaling) -> Any:
    """The Ray Serve application: `scaling.replicas` replicas of `EngineReplica` (or autoscaled), bound to `spec`;
    `serve.run(application(...), route_prefix="/")` serves it, as does `serve run` with a module that builds it."""
    options: dict[str, Any] = {
        "name": APP_NAME,
        "ray_actor_options": {"num_cpus": scaling.cpus_per_replica, "num_gpus": scaling.gpus_per_replica},
        "max_ongoing_requests": spec.serve.max_in_flight + spec.serve.max_queue,
        "max_queued_requests": spec.serve.max_queue,
        "graceful_shutdown_timeout_s": 30,
    }
    if scaling.max_replicas is None:
        options["num_replicas"] = scaling.replicas
    else:
        options["autoscaling_config"] = {"min_replicas": scaling.replicas, "max_replicas": scaling.max_replicas,
                                         "target_ongoing_requests": spec.serve.max_in_flight}
    return serve.deployment(**options)(serve.ingress()(EngineReplica)).bind(spec)


def start(spec: ReplicaSpec, scaling: Scaling, *, host: str, port: int, address: str | None) -> bool:
    """Join the Ray cluster at `address` (or `RAY_ADDRESS`; else start a local instance) and deploy; returns once
    every replica serves. True when this call started Ray (so `stop` shuts it down)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = address or os.environ.get("RAY_ADDRESS")
    started = not ray.is_initialized()
    if started:
        try:
            if address:
                ray.init(address=address)
            else:
                needed = scaling.cpus_per_replica * (scaling.max_replicas or scaling.replicas)
                ray.init(num_cpus=max(os.cpu_count() or 1, int(needed + 0.999)), include_dashboard=False)
        except (ConnectionError, RuntimeError, ValueError) as error:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise ProphetRAGError(f"cannot start or join {where}: {error}; check the address (`ray status`) or "
                                  "free memory.") from None
    serve.start(http_options={"host": host, "port": port})
    serve.run(application(spec, scaling), name=APP_NAME, route_prefix="/")
    return started


def stop(started: bool) -> None:
    import ray

    serve.delete(APP_NAME)
    serve.shutdown()
    if started:
        ray.shutdown()


def run(spec: ReplicaSpec, scaling: Scaling, *, host: str, port: int, address: str | None) -> None:
    """Deploy, then serve until SIGINT or SIGTERM, then take the replicas down."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    started = start(spec, scaling, host=host, port=port, address=address)
    how = (f"{scaling.replicas}-{scaling.max_replicas} replicas (autoscaling)" if scaling.max_replicas
           else f"{scaling.replicas} replica(s)")
    print(f"Serving {how} on Ray Serve at http://{host}:{port} (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        done.wait()
    finally:
        stop(started)
