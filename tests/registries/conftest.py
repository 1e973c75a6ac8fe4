"""Registry servers on loopback for the tests in this folder (defined in tests/registries/fixtures.py):

    tiny_models    session   TinyModels(base, adapter): local folders to publish
    hub_server     session   FakeHub: a Hugging Face hub-compatible server and its LFS CDN
    hub            function  the same, request log emptied first, faults healed after
    s3_server      session   S3Server: moto's S3 with a per-key request count
    s3             function  the same, request log emptied first
    s3_bucket      function  the name of a new versioned bucket
    mlflow_server  session   MlflowServer: `mlflow server` (SQLite + proxied artifacts)

and the publishing tests' models (tests/registries/publishing.py):

    models         module    Models: a Llama-shaped base and two LoRA adapters, the root the services merge from
"""

from tests.registries.fixtures import (
    TinyModels,
    hub,
    hub_server,
    mlflow_server,
    s3,
    s3_bucket,
    s3_server,
    tiny_models,
)
from tests.registries.publishing import models

__all__ = ["TinyModels", "hub", "hub_server", "mlflow_server", "models", "s3", "s3_bucket", "s3_server",
           "tiny_models"]
