"""``launch/serve.py``: from the composed config to a listening server, in one process or as one
torchrun group (one replica).

In order, so that every mistake costs nothing: the settings checked (the schema's own checks ran
on the command line already) and the layout (``parallel``, as ``launch/generate.py`` takes it;
data parallel is refused: a replica runs one job at a time, so more replicas sharing a queue are
the way to use more groups); on rank 0 the API keys read, the port bound (a port in use is one
``error:`` line before any weight is read), the job table opened and the jobs a stopped server left
running handled (serve.on_interrupted). Then the process group; then rank 0 answers HTTP at once
(``/health``: loading) while every rank builds the engine as the batch command does
(bindweave/app/build.py: one plan, for the largest request the server accepts, then
``build_engine``) and rank 0 loads the Qwen2.5-VL; then ``/health`` says ready and the worker runs the
queue. uvicorn serves until Ctrl-C or SIGTERM (the running job goes back to the queue at its next
step boundary, then the other ranks are released: bindweave/app/serve_group.py).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from bindweave.errors import BindWeaveInputError, report_input_error

log = logging.getLogger("bindweave")


class ServeCommand:
    def __call__(self, cfg: DictConfig) -> dict:
        from parallel.distributed import detect_processes

        processes = detect_processes()
        try:
            return self._serve(cfg, processes)
        except BindWeaveInputError as error:
            if processes.rank == 0:
                report_input_error(error)
            return {"exit_code": 2, "error": str(error)}

    def _serve(self, cfg: DictConfig, processes) -> dict:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from bindweave.app.build import plan_build, process_device
        from bindweave.app.config import settings_of
        from bindweave.sampling.calibration import load_calibration
        from parallel.distributed import smallest_across_ranks, start_process_group, stop_process_group
        from parallel.runtime import Runtime

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise BindWeaveInputError("launch/serve.py runs one server: drop -m (a request chooses seed, steps, size)")
        config = settings_of(cfg)
        request = largest_request(config)
        plan = plan_build(request, processes)  # every refusal before the port is bound or a weight read
        layout = plan.layout
        if layout.data > 1:
            raise BindWeaveInputError(
                f"launch/serve.py under {processes.world_size} processes got {layout.describe()}: a replica runs one "
                "job at a time on all its ranks, so data parallel does not apply. Give a layout without data "
                "(e.g. parallel=cfg2_ulysses4 for 8 GPUs), or start one replica per group of GPUs with "
                "serve.store=postgres so that they share one queue")
        load_calibration(config.cache.calibration)  # a wrong calibration file fails before anything loads
        front = Front.open(config) if processes.rank == 0 else None  # keys, port, job table
        device = process_device(config.model.device, processes)
        start_process_group(processes, device.type, config.parallel.timeout_s)
        try:
            if processes.world_size > 1:  # the ranks load and stream the DiT together: one plan for the smallest GPU
                plan = plan_build(request, processes, agree=smallest_across_ranks)
            runtime = Runtime.build(plan.layout, processes, device)
            channel = None
            if processes.world_size > 1:
                from bindweave.app.serve_group import JobChannel

                channel = JobChannel()
            log.info("rank %d of %d (pid %d): %s", processes.rank, processes.world_size, os.getpid(), layout.describe())
            build = lambda: replica_engine(plan, config, runtime, processes, channel)  # noqa: E731
            if front is None:
                return follow_rank0(build, channel)
            return front.serve(build, release=(lambda engine: engine.close()) if channel is not None
                               else (lambda engine: None))
        finally:
            stop_process_group()


def largest_request(config):
    """What the server's plan is for: its model and layout, and the largest video a request may ask
    (serve.max_video_pixels at the default video's shape where it fits, serve.max_frames), so that a
    request the server accepts never finds the memory plan too small."""
    from bindweave.app.build import BuildRequest

    video, serve = config.video, config.serve
    if video.height * video.width < serve.max_video_pixels:
        side = int(serve.max_video_pixels ** 0.5) // 16 * 16
        video = replace(video, height=side, width=side)
    return BuildRequest(config.model, replace(video, num_frames=max(video.num_frames, serve.max_frames)),
                        config.parallel, config.sampler)


def replica_engine(plan, config, runtime, processes, channel):
    """This rank's engine, built by the plan as the batch command builds it (rank 0: the one the worker drives)."""
    from bindweave.app.build import build_engine

    engine = build_engine(plan, runtime, config.model.gpu_memory_gib)
    if channel is None or processes.rank != 0:
        return engine
    from bindweave.app.serve_group import GroupEngine

    return GroupEngine(engine, channel)


def follow_rank0(build_engine, channel) -> dict:
    """A rank other than 0: build the engine, then run the jobs rank 0 hands out until it says stop.
    SIGTERM is ignored here (torchrun sends it to every rank): rank 0 drains and then releases this rank."""
    from bindweave.app.serve_group import follow
    from bindweave.serve.worker import EXIT_REPLICA_BROKEN, ReplicaBroken

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    engine = build_engine()
    try:
        follow(engine, channel)
    except ReplicaBroken as error:
        log.critical("%s; the replica stops (exit code %d)", error, EXIT_REPLICA_BROKEN)
        return {"exit_code": EXIT_REPLICA_BROKEN, "error": str(error)}
    return {"exit_code": 0}


class Front:
    """Rank 0's part: the keys, the listening socket, the job table, the HTTP app and the worker."""

    def __init__(self, config, keys, listener: socket.socket, store):
        self.config, self.keys, self.listener, self.store = config, keys, listener, store

    @classmethod
    def open(cls, config) -> Front:
        from bindweave.serve.auth import load_api_keys
        from bindweave.serve.store import open_store

        serve = config.serve
        keys = load_api_keys(serve)
        listener = bind(serve.host, serve.port)
        store = open_store(serve, serve.replica_name())
        recovered = store.recover(serve.on_interrupted, serve.max_attempts)
        if any(recovered.values()):
            log.info("jobs a stopped server left running: %s",
                     "; ".join(f"{what}: {', '.join(ids)}" for what, ids in recovered.items() if ids))
        return cls(config, keys, listener, store)

    def serve(self, make_engine, release) -> dict:
        """Answer HTTP now; ``make_engine()`` (with the Qwen2.5-VL) on a thread, then the worker; at the
        end ``release(engine)`` (under torchrun: the other ranks leave their loop)."""
        import uvicorn

        from bindweave.serve.api import create_app, video_object
        from bindweave.serve.callbacks import Callbacks
        from bindweave.serve.job_request import JobDefaults
        from bindweave.serve.metrics import Metrics
        from bindweave.serve.worker import Worker

        config, serve, store = self.config, self.config.serve, self.store
        defaults = JobDefaults(config.video, config.sampler, config.cache)
        metrics = Metrics()

        def describe(job_id: str) -> dict | None:
            record = store.get(job_id)
            return video_object(record, store, serve.model_name) if record is not None else None

        callbacks = Callbacks(describe, serve)
        worker = Worker(store, defaults, metrics, serve, on_ended=callbacks.job_ended)
        outcome = {"exit_code": 0}
        built = []

        def load() -> None:
            try:
                engine = make_engine()
                built.append(engine)
                worker.start(engine, load_prompt_encoder(config, engine))
                log.info("ready: serving %s as replica %s", serve.model_name, store.replica_id)
            except BindWeaveInputError as error:
                report_input_error(error)
                outcome.update(exit_code=2, error=str(error))
                worker.fail(str(error))
                server.should_exit = True
            except Exception as error:  # a bug or out of memory while loading: /health says broken, the process ends
                log.exception("the engine could not be built")
                outcome.update(exit_code=1, error=f"{type(error).__name__}: {error}")
                worker.fail(outcome["error"])
                server.should_exit = True

        def on_stop() -> None:
            """After the worker: the other ranks released, the pending webhooks given a last chance."""
            if built and worker.done:
                release(built[0])
            elif built:  # its job is still in a collective with them: they end when this process does
                log.warning("the worker did not stop in time: the other ranks are not released")
            callbacks.stop(serve.callback_timeout_s)

        def on_start() -> None:
            callbacks.start()
            threading.Thread(target=load, name="bindweave-load", daemon=True).start()

        app = create_app(store, worker, serve, self.keys, defaults, metrics, on_start=on_start, on_stop=on_stop)
        log.info("answering on http://%s:%d as replica %s (auth: %s, jobs in %s, files in %s, queue bound %d); "
                 "loading the models", serve.host, serve.port, store.replica_id, serve.auth, store.database.where,
                 Path(serve.state_dir).resolve(), serve.max_queue)
        # log_config=None: uvicorn logs through the project's logging (Hydra's job_logging).
        server = uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=10))
        server.run(sockets=[self.listener])
        store.close()
        return outcome


def load_prompt_encoder(config, engine):
    """Stage 2 in memory, on rank 0: the Qwen2.5-VL of the same model set as the DiT."""
    from bindweave.encoders.qwen import load_qwen
    from bindweave.serve.hidden_states import PromptEncoder

    encode = PromptEncoder(load_qwen(config.qwen))
    if encode.hidden_size != engine.models.hidden_dim:
        raise BindWeaveInputError(f"the Qwen2.5-VL gives {encode.hidden_size}-wide hidden states but the DiT takes "
                                  f"{engine.models.hidden_dim}: use the Qwen of the same model set (qwen=tiny with "
                                  "model=tiny, qwen=qwen2_5_vl_7b with model=bindweave_14b)")
    return encode


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before anything is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise BindWeaveInputError(f"cannot listen on {host}:{port} ({error.strerror}): choose another serve.port= "
                                  "or stop what uses it") from None
    listener.listen(128)
    listener.set_inheritable(True)
    return listener
