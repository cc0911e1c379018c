"""Where the services are: explicit environment variables, else the stack `genforge up` started."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from orchestrator import stack
from orchestrator.storage import S3Credentials, StorageError, open_storage

ENV_KEYS = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "GENFORGE_STORAGE")


@dataclass(frozen=True)
class Settings:
    ray_address: str
    tracking_uri: str
    storage: str  # root URI of genforge's objects, e.g. s3://team-bucket/genforge
    s3: S3Credentials = field(repr=False)
    dashboard_url: str | None = None
    ray_stack: str | None = None  # the local stack whose Ray this is: its token is used

    def use_ray(self) -> None:
        """Before this process imports Ray (it reads its authentication settings then): the
        local stack's token, when it is the stack's Ray (a cluster's own token comes from the
        environment, as Ray reads it)."""
        if self.ray_stack:
            stack.use_ray_auth(Path(self.ray_stack))


def resolve(environ: Mapping[str, str] | None = None, home: Path | None = None,
            *, start_stack: bool = False, echo=lambda _: None) -> Settings | None:
    """Settings from the environment, filled in from the local stack.

    With every service named in the environment the stack is not consulted. Otherwise the
    stack of `home` fills the gaps; with `start_stack` it is brought up when it is not running
    (the embedded default of `genforge run`). None when something is still missing.
    """
    env = dict(os.environ if environ is None else environ)
    state = None
    if not all(env.get(k) for k in ENV_KEYS):
        state = stack.status(home)
        if state is None and start_stack:
            echo("starting the local stack (genforge up) ...")
            state = stack.up(home, echo=echo)
    if state is not None:
        creds = stack.credentials(Path(state.home))
        defaults = {
            "RAY_ADDRESS": state.ray_address,
            "MLFLOW_TRACKING_URI": state.tracking_uri,
            "GENFORGE_STORAGE": state.storage,
            "AWS_ENDPOINT_URL": state.s3_endpoint,
            "AWS_ACCESS_KEY_ID": creds["access_key"],
            "AWS_SECRET_ACCESS_KEY": creds["secret_key"],
        }
        # The stack's own credentials go with its own endpoint, never with another one.
        if env.get("AWS_ENDPOINT_URL") not in (None, "", state.s3_endpoint):
            defaults = {k: v for k, v in defaults.items() if not k.startswith("AWS_")}
        env = {**defaults, **{k: v for k, v in env.items() if v}}
    if not all(env.get(k) for k in ENV_KEYS):
        return None
    return Settings(
        ray_address=env["RAY_ADDRESS"],
        tracking_uri=env["MLFLOW_TRACKING_URI"],
        storage=env["GENFORGE_STORAGE"].rstrip("/"),
        s3=S3Credentials.from_env(env),
        dashboard_url=state.dashboard_url if state else None,
        ray_stack=state.home if state and env["RAY_ADDRESS"] == state.ray_address else None,
    )


class ServiceError(Exception):
    """A service (storage, tracking, Ray) cannot be used; the message names it."""


def check_services(settings: Settings) -> None:
    """Fail before anything starts when storage or the tracking server cannot be reached."""
    from orchestrator.tracking import Tracker

    try:
        open_storage(settings.storage, settings.s3).check()
    except StorageError as exc:
        raise ServiceError(f"storage {settings.storage}: {exc}") from None
    try:
        Tracker(settings.tracking_uri).client.search_experiments(max_results=1)
    except Exception as exc:  # requests, MLflow REST and URI errors alike
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ServiceError(f"MLflow tracking server {settings.tracking_uri}: {first[:300]}") from None
