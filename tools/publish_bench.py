"""`python -m tools.publish_bench`: publishing the 1.1B benchmark model, against merging it.

The real service (`adapter-merge serve`, embedded mode) merges the benchmark's TinyLlama-1.1B-shaped bf16 base with
its r=16 LoRA adapter (generated and cached by `tools.bench`) and publishes the result, once to moto's S3 server and
once to an `mlflow server` (SQLite, proxied artifacts), both on loopback: the servers the test suite runs
(tests/registries). Each job is a fresh merge (`reuse: false`); its timings say how long the merge took (claim
until the merged folder is in place: resolve + merge + write) and how long publishing it took (`timings.publish`).
For scale, the same folder is then uploaded by each registry's own client the plain way (boto3's `upload_file`
with its default transfer settings and no checksums; MlflowClient's `log_artifacts` to a new run): the floor of
what that registry server takes on this machine.

Loopback and local disks, so the figures are the service's own cost of publishing (reading and hashing every byte,
checksummed uploads, the registry's work), not a network's; one run each, printed as a table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.registries.mlflow_server import MlflowServer, ensure_venv
from tests.registries.s3 import S3Server
from tests.service.harness import FINISHED, Api, service_env, start_server
from tools.bench import MODEL_1B, REPO, ensure_models

BUCKET = "publish-bench"
MB = 10**6


def publish_job(api: Api, target: str) -> dict[str, Any]:
    body = {"base_model": "base", "adapters": ["lora"], "reuse": False, "publish": {"to": target}}
    job = api.wait(api.submit(body)["id"], FINISHED, timeout=1800)
    if job["status"] != "succeeded":
        raise SystemExit(f"publishing to {target} failed: {job['error']}")
    return job


def client_upload(target: str, folder: Path, s3: S3Server, mlflow: MlflowServer) -> float:
    """Seconds the registry's own client takes to upload `folder` the plain way."""
    started = time.perf_counter()
    if target.startswith("s3://"):
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                s3.client().upload_file(str(path), BUCKET, f"client-upload/{path.relative_to(folder)}")
    else:
        client = mlflow.client()
        run_id = client.create_run(client.create_experiment(f"client-upload-{time.time_ns()}")).info.run_id
        client.log_artifacts(run_id, str(folder), artifact_path="model")
    return time.perf_counter() - started


def row(target: str, job: dict[str, Any], client_seconds: float) -> str:
    timings = job["timings"]
    merged = timings["resolve"] + timings["merge"] + timings["write"]
    size = sum(artifact["size"] for artifact in job["artifacts"])
    return (f"| {target} | {size / MB:,.0f} MB | {merged:.1f} s (engine merge {timings['merge']:.1f} s) | "
            f"{timings['publish']:.1f} s ({size / MB / timings['publish']:,.0f} MB/s) | "
            f"{timings['publish'] / merged:.2f}x | {client_seconds:.1f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "bench-data",
                        help="where tools.bench keeps the generated models (default: bench-data/)")
    args = parser.parse_args()
    models = ensure_models(MODEL_1B, args.data_dir.resolve())
    with tempfile.TemporaryDirectory(prefix="publish-bench-") as scratch:
        root = Path(scratch)
        s3 = S3Server().start()
        mlflow = MlflowServer(root / "mlflow", ensure_venv()).start()
        try:
            s3.create_bucket(BUCKET)
            env = service_env(root / "service", models, **s3.env, **mlflow.env,
                              MERGE_ALLOWED_SOURCES=f"s3://{BUCKET}/*,models:/publish-bench*",
                              MERGE_DOWNLOAD_TIMEOUT_SECONDS="120")
            server, api = start_server(env, root / "server.log")
            try:
                rows = []
                for target in (f"s3://{BUCKET}/tinyllama-1.1b-lora", "models:/publish-bench-1.1b"):
                    job = publish_job(api, target)
                    folder = root / "service" / "artifacts" / job["id"] / f"attempt-{job['attempts']}"
                    rows.append(row(target, job, client_upload(target, folder, s3, mlflow)))
            finally:
                api.close()
                server.stop()
        finally:
            mlflow.stop()
            s3.stop()
    print("\n| target | merged model | merge (claim until in place) | publish | publish / merge | the registry's "
          "client, plain upload |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
