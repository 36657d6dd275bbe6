"""``launch/serve.py``: from the composed config to a listening server.

In order, so that every mistake costs nothing: the settings checked (the schema's own checks ran
on the command line already), the API keys read, the port bound (a port in use is one ``error:``
line before any weight is read), the job table opened and the jobs a dead server left running
handled (serve.on_interrupted); then stage 3 and the Qwen2.5-VL loaded once, and uvicorn serves
until Ctrl-C or SIGTERM (the running job goes back to the queue at its next step boundary).

One process, one engine, built as the batch command builds it (``bindweave.app.generate.build_models``:
the memory plan, the speed options, the kernel at each call site) with the single-process runtime.
Serving from a torchrun launch (rank 0 serving HTTP and handing jobs to the others) is not done
yet: docs/SERVING.md says what it needs.
"""

from __future__ import annotations

import logging
import socket
from pathlib import Path

from omegaconf import DictConfig

from bindweave.errors import BindWeaveInputError, report_input_error

log = logging.getLogger("bindweave")


class ServeCommand:
    def __call__(self, cfg: DictConfig) -> dict:
        try:
            return self._serve(cfg)
        except BindWeaveInputError as error:
            report_input_error(error)
            return {"exit_code": 2, "error": str(error)}

    def _serve(self, cfg: DictConfig) -> dict:
        import uvicorn
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        from bindweave.app.config import settings_of
        from bindweave.encoders.qwen import load_qwen
        from bindweave.model.speed import check_speed_support
        from bindweave.sampling.calibration import load_calibration
        from bindweave.serve.api import create_app
        from bindweave.serve.auth import load_api_keys
        from bindweave.serve.hidden_states import PromptEncoder
        from bindweave.serve.job_request import JobDefaults
        from bindweave.serve.metrics import Metrics
        from bindweave.serve.store import open_store
        from bindweave.serve.worker import Worker
        from bindweave.app.generate import build_models, memory_plan
        from bindweave.stages.engine import Stage3Engine
        from parallel.layout import ParallelLayout
        from parallel.runtime import Runtime

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise BindWeaveInputError("launch/serve.py runs one server: drop -m (a request chooses seed, steps, size)")
        config = settings_of(cfg)
        serve = config.serve
        keys = load_api_keys(serve)
        check_speed_support(config.model.speed_options(), config.model.resolved_device())
        load_calibration(config.cache.calibration)  # a wrong calibration file fails before anything loads
        listener = bind(serve.host, serve.port)
        store = open_store(serve, serve.replica_name())
        recovered = store.recover(serve.on_interrupted, serve.max_attempts)
        if any(recovered.values()):
            log.info("jobs a stopped server left running: %s",
                     "; ".join(f"{what}: {', '.join(ids)}" for what, ids in recovered.items() if ids))

        device = config.model.resolved_device()
        runtime = Runtime.single_process(device)
        plan = memory_plan(config.model, config.video, ParallelLayout(), rank=0)  # for the largest default job
        engine = Stage3Engine(build_models(config.model, runtime, device.type, plan), runtime)
        encode = PromptEncoder(load_qwen(config.qwen))
        if encode.hidden_size != engine.models.hidden_dim:
            raise BindWeaveInputError(f"the Qwen2.5-VL gives {encode.hidden_size}-wide hidden states but the DiT takes "
                                      f"{engine.models.hidden_dim}: use the Qwen of the same model set (qwen=tiny with "
                                      "model=tiny, qwen=qwen2_5_vl_7b with model=bindweave_14b)")
        defaults = JobDefaults(config.video, config.sampler, config.cache)
        metrics = Metrics()
        worker = Worker(engine, encode, store, defaults, metrics, serve)
        app = create_app(store, worker, serve, keys, defaults, metrics)
        log.info("serving %s on http://%s:%d as replica %s (auth: %s, jobs in %s, files in %s, queue bound %d)",
                 serve.model_name, serve.host, serve.port, store.replica_id, serve.auth, store.database.where,
                 Path(serve.state_dir).resolve(), serve.max_queue)
        # log_config=None: uvicorn logs through the project's logging (Hydra's job_logging).
        uvicorn.Server(uvicorn.Config(app, log_config=None, timeout_graceful_shutdown=10)).run(sockets=[listener])
        store.close()
        return {"exit_code": 0}


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
