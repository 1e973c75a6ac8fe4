"""Publishing to an MLflow model registry: `models:/NAME` gets a new version holding the merged folder.

The way the server accepts (it refuses model-version sources outside a run's artifacts): one run per request digest
in the experiment MERGE_PUBLISH_MLFLOW_EXPERIMENT holds the folder under `model/` and `merge_lineage.json` beside
it (versions of other registered models from the same merge share it); the version is created from
`runs:/<run>/model` with the lineage as tags (the run carries them too), the registered model first if it is
missing; once the version is READY, `alias` (if asked for) moves to it.

Every step looks before it creates, so a rerun after a crash at any point ends with exactly one version: a READY
(or pending) version of NAME tagged with the request digest is the result; a run of the digest is reused, its
upload done again unless it was marked complete. Requests go through the source's transport (`MlflowRest`: the
service's timeout and retries, MLflow's own credentials and TLS settings); artifacts go through the tracking
server's artifact proxy, as the source reads them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

from adapter_merge.core.jobs import Published
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.publish.base import LINEAGE_FILE, TO_FIELD, ByteCounter, Lineage
from adapter_merge.core.refs import BadReference
from adapter_merge.core.request import PublishSpec
from adapter_merge.core.settings import Settings
from adapter_merge.core.sources.base import RegistryUnavailable
from adapter_merge.core.sources.mlflow import API, ARTIFACTS, MlflowFailed, MlflowRest, proxied_path, transient

TARGET = re.compile(r"models:/(?P<name>[^/@:'\"\\\x00-\x1f]+)")
"""A registered model's name: no `/`, `@` or `:` (MLflow's own rules, and the source's reference forms), and no
quotes, which would end the name inside a search filter."""
MODEL_PATH = "model"
"""Where the merged folder goes in the run's artifacts (the source finds a model in such a sub-folder)."""
COMPLETE_TAG = "artifacts_complete"
READY_POLL_SECONDS = 0.5
MAX_BATCH_TAGS = 100
"""MLflow's limit of tags per log-batch request."""


class MlflowTarget:
    scheme = "models"

    def __init__(self, settings: Settings) -> None:
        self.rest = MlflowRest(settings)
        self.experiment = settings.publish_mlflow_experiment
        self.ready_seconds = settings.publish_ready_seconds

    def check(self, spec: PublishSpec, field: str) -> None:
        _name(spec, field)

    def find(self, spec: PublishSpec, lineage: Lineage) -> Published | None:
        """A READY version of this request digest, with the alias (if asked for) already on it."""
        name = _name(spec, TO_FIELD)
        try:
            version = self._version_of(name, lineage)
            if version is None or version["status"] != "READY":
                return None
            if spec.alias and self._alias_version(name, spec.alias) != version["version"]:
                return None
        except MlflowFailed as error:
            raise _problem(error, spec) from None
        return self._published(spec, name, version)

    def publish(self, spec: PublishSpec, folder: Path, lineage: Lineage, progress: ByteCounter) -> Published:
        name = _name(spec, TO_FIELD)
        try:
            version = self._version_of(name, lineage)
            if version is None:
                run_id = self._run_with_artifacts(folder, lineage, progress)
                self._create_registered_model(name)
                version = self.rest.json(f"{API}/model-versions/create", method="POST", body={
                    "name": name, "source": f"runs:/{run_id}/{MODEL_PATH}", "run_id": run_id,
                    "tags": _tag_list(lineage.tags()), "description": f"Merged by adapter-merge job {lineage.job_id}",
                })["model_version"]
            version = self._wait_ready(spec, name, version)
            if spec.alias:
                self.rest.json(f"{API}/registered-models/alias", method="POST",
                               body={"name": name, "alias": spec.alias, "version": version["version"]})
        except MlflowFailed as error:
            raise _problem(error, spec) from None
        return self._published(spec, name, version)

    # -- steps ------------------------------------------------------------------------------------------------------

    def _version_of(self, name: str, lineage: Lineage) -> dict[str, Any] | None:
        """The newest version of NAME tagged with the request digest that did not fail to register."""
        found = self.rest.json(f"{API}/model-versions/search", {
            "filter": f"name = '{name}' and tags.request_digest = '{lineage.request_digest}'",
            "order_by": "version_number DESC", "max_results": "10"}).get("model_versions", [])
        return next((version for version in found if version.get("status") != "FAILED_REGISTRATION"), None)

    def _run_with_artifacts(self, folder: Path, lineage: Lineage, progress: ByteCounter) -> str:
        """The run holding the folder: one of this digest whose upload completed, else that run (or a new one)
        with the folder uploaded again."""
        experiment_id = self._experiment_id()
        runs = self.rest.json(f"{API}/runs/search", method="POST", body={
            "experiment_ids": [experiment_id], "filter": f"tags.request_digest = '{lineage.request_digest}'",
            "max_results": 10}).get("runs", [])
        complete = [run for run in runs if {"key": COMPLETE_TAG, "value": "true"} in run["data"].get("tags", [])]
        if complete:
            progress(sum((folder / path).stat().st_size for path in lineage.manifest_sha256))  # there already
            return str(complete[0]["info"]["run_id"])
        if runs:
            info = runs[0]["info"]
        else:
            info = self.rest.json(f"{API}/runs/create", method="POST", body={
                "experiment_id": experiment_id, "run_name": f"merge-{lineage.job_id}",
                "start_time": int(time.time() * 1000),
                "tags": _tag_list({"request_digest": lineage.request_digest})})["run"]["info"]
        tags = _tag_list(lineage.tags())  # this run's lineage: a rerun's merge has a manifest of its own
        for first in range(0, len(tags), MAX_BATCH_TAGS):
            self.rest.json(f"{API}/runs/log-batch", method="POST",
                           body={"run_id": info["run_id"], "tags": tags[first:first + MAX_BATCH_TAGS]})
        root = proxied_path(info["artifact_uri"], self.rest.tracking_uri)
        if root is None:
            raise MlflowFailed(None, reason=f"the run's artifacts are not behind the tracking server's artifact proxy "
                               f"({info['artifact_uri'].split(':', 1)[0]}); run mlflow server --serve-artifacts")
        for path in sorted(lineage.manifest_sha256):
            with open(folder / path, "rb") as source:
                self._put_artifact(f"{root}/{MODEL_PATH}/{path}", source, progress)
        self.rest.request(f"{ARTIFACTS}/{quote(f'{root}/{LINEAGE_FILE}')}", method="PUT",
                          data=lineage.model_dump_json(indent=2).encode()).close()
        self.rest.json(f"{API}/runs/set-tag", method="POST",
                       body={"run_id": info["run_id"], "key": COMPLETE_TAG, "value": "true"})
        self.rest.json(f"{API}/runs/update", method="POST", body={
            "run_id": info["run_id"], "status": "FINISHED", "end_time": int(time.time() * 1000)})
        return str(info["run_id"])

    def _put_artifact(self, path: str, source: IO[bytes], progress: ByteCounter) -> None:
        self.rest.request(f"{ARTIFACTS}/{quote(path)}", method="PUT", data=_Counted(source, progress),
                          headers={"Content-Type": "application/octet-stream"}).close()

    def _experiment_id(self) -> str:
        try:
            found = self.rest.json(f"{API}/experiments/get-by-name", {"experiment_name": self.experiment})
            return str(found["experiment"]["experiment_id"])
        except MlflowFailed as error:
            if error.code != "RESOURCE_DOES_NOT_EXIST":
                raise
        try:
            return str(self.rest.json(f"{API}/experiments/create", method="POST",
                                      body={"name": self.experiment})["experiment_id"])
        except MlflowFailed as error:
            if error.code != "RESOURCE_ALREADY_EXISTS":  # another worker created it meanwhile
                raise
        return str(self.rest.json(f"{API}/experiments/get-by-name",
                                  {"experiment_name": self.experiment})["experiment"]["experiment_id"])

    def _create_registered_model(self, name: str) -> None:
        try:
            self.rest.json(f"{API}/registered-models/create", method="POST", body={"name": name})
        except MlflowFailed as error:
            if error.code != "RESOURCE_ALREADY_EXISTS":
                raise

    def _wait_ready(self, spec: PublishSpec, name: str, version: dict[str, Any]) -> dict[str, Any]:
        deadline = time.monotonic() + self.ready_seconds
        while version["status"] != "READY":
            if version["status"] == "FAILED_REGISTRATION" or time.monotonic() > deadline:
                raise Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r}: version {version['version']} "
                              f"did not become READY (status {version['status']}: "
                              f"{version.get('status_message') or 'no message'})", field=TO_FIELD, ref=spec.to)
            time.sleep(READY_POLL_SECONDS)
            version = self.rest.json(f"{API}/model-versions/get",
                                     {"name": name, "version": version["version"]})["model_version"]
        return version

    def _alias_version(self, name: str, alias: str) -> str | None:
        try:
            return str(self.rest.json(f"{API}/registered-models/alias",
                                      {"name": name, "alias": alias})["model_version"]["version"])
        except MlflowFailed as error:
            if error.status == 404 or error.code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise

    def _published(self, spec: PublishSpec, name: str, version: dict[str, Any]) -> Published:
        return Published(uri=spec.to, version=str(version["version"]),
                         url=f"{self.rest.tracking_uri.rstrip('/')}/#/models/{quote(name)}/versions/"
                             f"{version['version']}")


class _Counted:
    """A file as a request body that tells `progress` of every byte read for the first time (a retried request
    rewinds it and reads again; those bytes are not counted twice)."""

    def __init__(self, source: IO[bytes], progress: ByteCounter) -> None:
        self.source = source
        self.progress = progress
        self.counted = 0
        self.size = source.seek(0, 2)
        source.seek(0)

    def __len__(self) -> int:
        """The whole size: requests subtracts the position itself."""
        return self.size

    def read(self, size: int = -1) -> bytes:
        data = self.source.read(size)
        position = self.source.tell()
        if position > self.counted:
            self.progress(position - self.counted)
            self.counted = position
        return data

    def tell(self) -> int:
        return self.source.tell()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.source.seek(offset, whence)


def _name(spec: PublishSpec, field: str) -> str:
    match = TARGET.fullmatch(spec.to)
    if match is None:
        raise BadReference(field, spec.to, Problems.REFERENCE_INVALID, "is not an MLflow registered model to publish "
                           "to (models:/NAME, a new version of NAME; no version or alias)")
    return match.group("name")


def _tag_list(tags: dict[str, str]) -> list[dict[str, str]]:
    return [{"key": key, "value": value} for key, value in tags.items()]


def _problem(error: MlflowFailed, spec: PublishSpec) -> Problem:
    """A registry out of reach is a 503 (try again); a refusal is publish-failed."""
    if transient(error):
        return RegistryUnavailable(TO_FIELD, spec.to, str(error))
    why = (f"the registry refused the service's credentials ({error})" if error.status in (401, 403)
           else f"the registry refused it ({error})")
    return Problem(Problems.PUBLISH_FAILED, f"{TO_FIELD}: {spec.to!r} could not be published: {why}",
                   field=TO_FIELD, ref=spec.to)
