"""Where the services are: explicit environment variables, else the stack `genforge up` started."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from orchestrator import stack
from orchestrator.storage import S3Credentials

ENV_KEYS = ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "GENFORGE_STORAGE")


@dataclass(frozen=True)
class Settings:
    ray_address: str
    tracking_uri: str
    storage: str  # root URI of genforge's objects, e.g. s3://team-bucket/genforge
    s3: S3Credentials = field(repr=False)
    dashboard_url: str | None = None


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
    )
