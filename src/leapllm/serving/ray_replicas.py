"""`leapllm serve --replicas N`: N engine replicas behind one OpenAI-compatible endpoint, on Ray Serve.

Each replica is a Ray actor that loads the model and runs the very app `leapllm serve` runs
(create_app over its own AsyncEngine and paged KV cache). Ray Serve's HTTP proxy takes the
requests and routes each to a replica with room for it (power of two choices on queue length);
with --max-replicas M it adds replicas up to M while the ongoing requests per replica stay above
the target, and removes them again down to N.

    leapllm serve --replicas 2 --ray-address auto          # a local Ray instance, stopped with the server
    leapllm serve --replicas 8 --ray-address HEAD:6379     # an existing Ray cluster (docs/scale-out.md)

Failures: a replica that dies is replaced by Ray Serve's controller; the requests it was running
fail (a 500 from the proxy, or a stream cut short) instead of hanging, and new requests go to the
replicas that are alive. A replica whose engine thread died fails its health check and is
replaced the same way. Every response names its replica in the `x-leapllm-replica` header (the
replica's Ray actor name) and `x-leapllm-replica-pid` its process, which is how the tests kill the
right one.

Ray is an optional extra (`pip install leapllm[ray]`); nothing here imports it before it is needed.
"""

from __future__ import annotations

import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

from leapllm.config import EngineConfig, ModelSettings, ServerSettings, available_cpus
from leapllm.errors import InvalidRequestError

APP_NAME = "leapllm"
REPLICA_HEADER = "x-leapllm-replica"  # the replica's Ray actor name
REPLICA_PID_HEADER = "x-leapllm-replica-pid"  # and its process, for operators (and tests) that need to find it
OBJECT_STORE_BYTES = 128 * 2**20  # requests and responses are small; Ray's default takes 30% of RAM


def ray_missing() -> str | None:
    """None if Ray Serve can be imported, else the one-line reason to show."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError:
        return "--replicas needs Ray Serve: pip install leapllm[ray]"
    return None


@dataclass
class ReplicaSettings:
    """Everything a replica needs to build its server; sent to each replica by Ray."""
    model: str | None
    model_name: str
    dtype: str = "auto"
    device: str = "auto"
    threads: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    max_waiting: int = 256
    api_key: str | None = None
    shutdown_timeout: float = 30.0


class ReplicaHeader:
    """ASGI middleware: name the replica in every HTTP response."""

    def __init__(self, app, replica: str):
        self.app = app
        self.headers = [(REPLICA_HEADER.encode(), replica.encode()),
                        (REPLICA_PID_HEADER.encode(), str(os.getpid()).encode())]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_header(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_header)


class LeapLLMReplica:
    """One replica: the model, its engine and the OpenAI app, built inside the Ray actor."""

    def __init__(self, settings: ReplicaSettings):
        from ray import serve

        from leapllm.engine.async_engine import AsyncEngine
        from leapllm.engine.llm_engine import LLMEngine
        from leapllm.llm import LLM
        from leapllm.serving.app import create_app

        llm = LLM(settings.model, dtype=settings.dtype, device=settings.device, num_threads=settings.threads)
        self.engine = AsyncEngine(LLMEngine(llm.model, llm.tokenizer, settings.engine),
                                  max_waiting=settings.max_waiting)
        app = create_app(self.engine, llm.tokenizer, settings.model_name, llm.config.context_length,
                         api_key=settings.api_key, shutdown_grace_s=settings.shutdown_timeout)
        self.replica = serve.get_replica_context().replica_id.to_full_id_str()
        # Ray Serve runs the app's lifespan (engine thread start, drain at shutdown) through the middleware.
        self.asgi_app = ReplicaHeader(app, self.replica)

    def __serve_build_asgi_app__(self):
        return self.asgi_app

    def check_health(self) -> None:
        """Ray Serve calls this periodically; raising makes it replace the replica."""
        if self.engine.dead is not None:
            raise RuntimeError(f"the engine thread died: {self.engine.dead!r}")


def deployment_options(replicas: int, max_replicas: int | None, settings: ReplicaSettings) -> dict:
    """serve.deployment(...) options: the replica count or autoscaling range, and each replica's resources."""
    if replicas < 1:
        raise InvalidRequestError(f"--replicas must be at least 1, got {replicas}")
    if max_replicas is not None and max_replicas < replicas:
        raise InvalidRequestError(f"--max-replicas ({max_replicas}) must be at least --replicas ({replicas})")
    # The engine batches up to max_num_seqs sequences; more requests per replica only wait in its queue,
    # so let them wait at the proxy instead, where they go to whichever replica frees up first.
    options = {"name": "LeapLLMReplica", "max_ongoing_requests": settings.engine.max_num_seqs,
               "max_queued_requests": settings.max_waiting,
               "graceful_shutdown_timeout_s": settings.shutdown_timeout + 5,
               "health_check_period_s": 5.0}
    if settings.device.startswith("cuda"):
        options["ray_actor_options"] = {"num_gpus": 1, "num_cpus": 1}
    else:
        options["ray_actor_options"] = {"num_cpus": settings.threads}
    if max_replicas is not None and max_replicas > replicas:
        options["autoscaling_config"] = {"min_replicas": replicas, "initial_replicas": replicas,
                                         "max_replicas": max_replicas,
                                         "target_ongoing_requests": max(1, settings.engine.max_num_seqs // 2)}
    else:
        options["num_replicas"] = replicas
    return options


class RayReplicas:
    """N replicas deployed on Ray Serve, reachable at `url`; `stop()` undeploys (and stops a local Ray).

        replicas = RayReplicas(settings, 2, address="auto", port=8000).start()
        ...  # http://127.0.0.1:8000/v1
        replicas.stop()
    """

    def __init__(self, settings: ReplicaSettings, replicas: int, *, max_replicas: int | None = None,
                 address: str = "auto", host: str = "127.0.0.1", port: int = 8000):
        missing = ray_missing()
        if missing:
            raise InvalidRequestError(missing)
        self.options = deployment_options(replicas, max_replicas, settings)
        self.settings, self.replicas, self.address = settings, replicas, address
        self.host, self.port = host, port
        self.local = address == "auto"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> RayReplicas:
        # Set before Ray is imported: no usage reports to the network.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        import ray
        from ray import serve

        if self.local:
            cpus = max(len(available_cpus()), self.replicas * int(self.options["ray_actor_options"].get("num_cpus", 1)))
            ray.init(address="local", num_cpus=cpus, object_store_memory=OBJECT_STORE_BYTES,
                     include_dashboard=False, _node_ip_address="127.0.0.1", namespace=APP_NAME,
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=self.address, namespace=APP_NAME, log_to_driver=False)
        try:
            serve.start(http_options={"host": self.host, "port": self.port})
            deployment = serve.deployment(**self.options)(serve.ingress()(LeapLLMReplica))
            # Returns once every replica has loaded the model and started.
            serve.run(deployment.bind(self.settings), name=APP_NAME, route_prefix="/")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        try:
            if self.local:
                serve.shutdown()
            else:  # the cluster may serve other applications: remove only ours
                serve.delete(APP_NAME)
        finally:
            ray.shutdown()


def serve_replicas(server: ServerSettings, model: ModelSettings, config: EngineConfig) -> int:
    """`leapllm serve --replicas N`: deploy, print the address, wait for SIGTERM / Ctrl-C, undeploy."""
    import sys

    from leapllm.loading.default_model import default_model_name, default_model_path
    from leapllm.serving.runner import bind_socket

    path = Path(model.model).expanduser() if model.model else default_model_path()
    if not path.exists():
        raise InvalidRequestError(f"{path}: no such file or folder")
    bind_socket(server.host, server.port).close()  # a taken port is a one-line error now, not a Ray traceback later
    port = server.port
    if port == 0:
        with bind_socket(server.host, 0) as sock:
            port = sock.getsockname()[1]
    address = server.ray_address or "auto"
    cpus = len(available_cpus())
    threads = model.threads or (max(1, cpus // server.replicas) if address == "auto" else 1)
    settings = ReplicaSettings(
        model=str(path.resolve()), model_name=server.served_model_name or default_model_name(path),
        dtype=model.dtype, device=model.device, threads=threads, engine=config, max_waiting=server.max_waiting,
        api_key=server.api_key, shutdown_timeout=server.shutdown_timeout)
    replicas = RayReplicas(settings, server.replicas, max_replicas=server.max_replicas, address=address,
                           host=server.host, port=port)
    stop = threading.Event()

    def interrupt(*_):
        raise KeyboardInterrupt

    # While Ray starts, SIGTERM interrupts like Ctrl-C does, so that `finally` still stops what started.
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        replicas.start()
        for sig in previous:  # set after ray.init, which may install handlers of its own
            signal.signal(sig, lambda *_: stop.set())
        scaling = (f"{server.replicas} to {server.max_replicas} replicas" if server.max_replicas
                   and server.max_replicas > server.replicas else f"{server.replicas} replicas")
        print(f"leapllm: serving {settings.model_name} at {replicas.url}/v1 ({scaling} on Ray Serve, "
              f"{threads} threads each{', API key required' if server.api_key else ''})", file=sys.stderr,
              flush=True)
        while not stop.wait(0.5):
            pass
        print("leapllm: stopping the replicas", file=sys.stderr, flush=True)
    finally:
        replicas.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
