"""`prophet-rag serve`: arguments and the command, kept beside the server so the main CLI only delegates.

Nothing here imports the server's packages until the command runs, so `prophet-rag --help` works without them.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from typing import Any

from prophet_rag.config import BatchConfig, GenerationConfig, PrefixCacheConfig, SelectionConfig, StoreConfig
from prophet_rag.errors import ProphetRAGError
from prophet_rag.serve.config import API_KEY_ENV, ReplicaSpec, ServeConfig, read_api_key

SERVE_INSTALL = "pip install 'prophet-rag[serve]'"
RAY_OPTIONS = ("replicas", "max_replicas", "address", "cpus_per_replica", "gpus_per_replica")


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The server's own options (the model, store and selection options are the CLI's common ones)."""
    defaults = ServeConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0: all)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--remote-url", default=None,
                        help="shared Redis/Valkey tier, redis://host:6379/0 (StoreConfig.remote_url; needs a key)")
    parser.add_argument("--api-key-file", default=None,
                        help=f"file holding the bearer key every /v1 request must carry (or set {API_KEY_ENV})")
    parser.add_argument("--served-model-name", default=None, help="model id in /v1/models and responses")
    parser.add_argument("--max-batch", type=int, default=BatchConfig().max_batch,
                        help="requests the engine decodes together, one forward pass per step (default "
                             "%(default)s; 1 turns batching off: requests run one after another)")
    parser.add_argument("--no-batch-prefills", dest="batch_prefills", action="store_false",
                        help="run each request's prefill passes alone between the decode steps, instead of in them "
                             "together with the other requests' (BatchConfig.batch_prefills)")
    parser.add_argument("--prefill-priority", type=int, default=BatchConfig().prefill_priority,
                        help="times in a row a new request's prefill may go before the running requests' next "
                             "decode step (default %(default)s; 0: arrival order; BatchConfig.prefill_priority)")
    parser.add_argument("--max-in-flight", type=int, default=None,
                        help="requests running on the engine at once (default: --max-batch)")
    parser.add_argument("--backend", default="prophet", choices=("prophet", "hf"),
                        help="prophet (default): the engine, with KV reuse and batching; hf: plain Hugging Face "
                             "generate on the flattened prompt, one request at a time (a baseline)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="requests waiting beyond those; more are answered 503 (default %(default)s)")
    parser.add_argument("--queue-timeout", type=float, default=defaults.queue_timeout_s,
                        help="seconds a request may wait for a worker before a 503 (default %(default)s)")
    parser.add_argument("--request-timeout", type=float, default=defaults.request_timeout_s,
                        help="seconds a request may take in all (default %(default)s)")
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--max-documents", type=int, default=defaults.max_documents)
    parser.add_argument("--max-chars", type=int, default=defaults.max_chars,
                        help="characters of documents and messages per request (default %(default)s)")
    parser.add_argument("--prefix-cache-bytes", type=int, default=0,
                        help="bytes of finished requests' KV kept so a conversation's next turn computes only its new "
                             "tokens (PrefixCacheConfig.max_bytes; default 0: off)")
    parser.add_argument("--workers", type=int, default=1,
                        help="engine processes behind the port, each on an equal share of the CPU threads, all "
                             "sharing the store (CPU only; default 1). On a CPU one process per core serves "
                             "concurrent clients faster than one process with every core (docs/serve.md)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    ray = parser.add_argument_group("replicas on Ray Serve (docs/serve.md)")
    ray.add_argument("--ray", action="store_true", help="serve engine replicas on Ray Serve behind one endpoint")
    ray.add_argument("--replicas", type=int, default=None, help="replicas (default 1; the minimum when autoscaling)")
    ray.add_argument("--max-replicas", type=int, default=None, help="autoscale up to this many replicas")
    ray.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS, else local)")
    ray.add_argument("--cpus-per-replica", type=float, default=None, help="CPUs each replica reserves and runs "
                     "torch on (default 1)")
    ray.add_argument("--gpus-per-replica", type=float, default=None,
                     help="GPUs each replica reserves (default: 1 with --device cuda, else 0)")


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The server's settings from the command's options."""
    return ServeConfig(api_key=read_api_key(args.api_key_file), model_name=args.served_model_name,
                       max_in_flight=args.max_batch if args.max_in_flight is None else args.max_in_flight,
                       max_queue=args.max_queue, queue_timeout_s=args.queue_timeout,
                       request_timeout_s=args.request_timeout, max_body_bytes=args.max_body_bytes,
                       max_documents=args.max_documents, max_chars=args.max_chars, max_tokens=args.max_new_tokens)


def engine_options(args: argparse.Namespace, config: ServeConfig) -> dict[str, Any]:
    """`ProphetEngine.from_pretrained`'s configs from the command's options: the same for one server and for every
    replica. Workers beyond the engine's batch wait inside it for a place (first come, first served), never refused
    there."""
    batch = BatchConfig(max_batch=args.max_batch, batch_prefills=args.batch_prefills,
                        prefill_priority=args.prefill_priority)
    return {"batch": replace(batch, max_waiting=max(config.max_in_flight - batch.max_batch, 0)),
            "selection": SelectionConfig(method=args.method, ratio=args.ratio),
            "generation": GenerationConfig(max_new_tokens=args.max_new_tokens),
            "prefix_cache": PrefixCacheConfig(max_bytes=args.prefix_cache_bytes)}


def run_serve_command(args: argparse.Namespace, store: StoreConfig) -> int:
    try:
        import uvicorn

        from prophet_rag.serve.app import create_app
    except ImportError as error:
        raise ProphetRAGError(f"the server needs {error.name}; run `{SERVE_INSTALL}`.") from None
    from prophet_rag.engine import ProphetEngine
    from prophet_rag.engine.loading import model_dtype

    config = serve_config(args)
    store = _with_remote(args, store)
    if args.ray and args.workers != 1:
        raise ProphetRAGError("--workers starts engine processes on this machine and --ray deploys replicas on Ray "
                              "Serve; use one of them (--replicas N on Ray).")
    if args.ray:
        from prophet_rag.serve import replicas

        replicas.run(*ray_plan(args, store, config), host=args.host, port=args.port, address=args.address)
        return 0
    if any(getattr(args, name) is not None for name in RAY_OPTIONS):
        raise ProphetRAGError("--replicas, --max-replicas, --address, --cpus-per-replica and --gpus-per-replica "
                              "need --ray; add --ray or drop them.")
    if config.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"Warning: serving on {args.host} without an API key; set {API_KEY_ENV} or --api-key-file.",
              file=sys.stderr, flush=True)
    if args.workers != 1:
        _serve_workers(args, store, config)
        return 0
    print(f"Loading model {args.model or 'embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    engine = ProphetEngine.from_pretrained(args.model, device=args.device, dtype=model_dtype(args.dtype), store=store,
                                           **engine_options(args, config))
    if args.backend == "hf":
        from prophet_rag.serve.hf_backend import HFGenerateBackend

        engine = HFGenerateBackend(engine)
    with engine:
        uvicorn.run(create_app(engine, config), host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=30)
    return 0


def _serve_workers(args: argparse.Namespace, store: StoreConfig, config: ServeConfig) -> None:
    import torch

    from prophet_rag.serve import workers

    if args.backend != "prophet":
        raise ProphetRAGError("--backend hf is a one-process baseline; drop --workers, or serve the prophet-rag "
                              "engine.")
    if args.device != "cpu":
        raise ProphetRAGError(f"--workers is for CPU serving; on {args.device} one process batches every request "
                              "on the device: drop --workers.")
    threads = workers.threads_per_worker(args.workers, torch.get_num_threads())
    spec = ReplicaSpec(args.model, args.device, store, serve=config, threads=threads, dtype=args.dtype,
                       **engine_options(args, config))
    print(f"Starting {args.workers} workers, {threads} torch thread(s) each, on "
          f"{args.model or 'embedded SmolLM2-135M-Instruct'} ...", file=sys.stderr, flush=True)
    workers.run(spec, args.workers, host=args.host, port=args.port, log_level=args.log_level)


def _with_remote(args: argparse.Namespace, store: StoreConfig) -> StoreConfig:
    return replace(store, remote_url=args.remote_url) if args.remote_url else store


def ray_application(args: argparse.Namespace, store: StoreConfig):
    """The Ray Serve application `--ray` deploys, for a caller that runs it itself (`prophet_rag.cli:ray_app`)."""
    from prophet_rag.serve import replicas

    return replicas.application(*ray_plan(args, _with_remote(args, store), serve_config(args)))


def ray_plan(args: argparse.Namespace, store: StoreConfig, config: ServeConfig):
    """What `--ray` deploys: the replicas' `ReplicaSpec` and their `Scaling`, from the command's options."""
    try:
        from prophet_rag.serve import replicas
    except ImportError as error:
        raise ProphetRAGError(f"--ray needs {error.name}; run `pip install 'prophet-rag[serve-ray]'`.") from None
    if args.backend != "prophet":
        raise ProphetRAGError("--backend hf is a one-process baseline; drop --ray, or serve the prophet-rag engine.")
    cpus = args.cpus_per_replica if args.cpus_per_replica is not None else 1.0
    gpus = args.gpus_per_replica if args.gpus_per_replica is not None else float(args.device.startswith("cuda"))
    scaling = replicas.Scaling(replicas=args.replicas or 1, max_replicas=args.max_replicas, cpus_per_replica=cpus,
                               gpus_per_replica=gpus)
    if store.remote_url is None and (scaling.max_replicas or scaling.replicas) > 1:
        print("Warning: replicas without --remote-url share no tier: each computes every document itself.",
              file=sys.stderr, flush=True)
    spec = ReplicaSpec(args.model, args.device, store, serve=config, threads=max(1, int(cpus)), dtype=args.dtype,
                       **engine_options(args, config))
    return spec, scaling
