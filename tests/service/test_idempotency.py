"""The Idempotency-Key header of POST /merge (IETF draft semantics), against real servers in both modes: the
same key and body give the first answer again, another body a 422, a request while the first is still being
processed a 409; keys are per tenant; a malformed key is a 422 naming the header."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from adapter_merge.core import reuse
from tests.loopback import wait_for
from tests.service.checks import problem
from tests.service.conftest import ModelSet
from tests.service.deployments import Deployment, deployment, weighted
from tests.service.harness import FINISHED
from tests.service.test_auth import bearer

PROBLEM = "urn:adapter-merge:problem:"


@pytest.fixture(scope="module", params=["embedded", "distributed"])
def deployed(request: pytest.FixtureRequest, models: ModelSet,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    namespace = request.getfixturevalue("redis_namespace") if request.param == "distributed" else None
    with deployment(request.param, tmp_path_factory.mktemp(f"idempotency-{request.param}"), models.root,
                    namespace) as running:
        yield running


def jobs_of(deployed: Deployment) -> int:
    return deployed.api.http.get("/jobs").json()["total"]


def test_the_same_key_and_body_give_the_first_answer(deployed: Deployment) -> None:
    body = {**weighted(1.1), "reuse": False}  # a fresh merge every time, but for the key
    first = deployed.post(body, key="order-1")
    assert first.status_code == 202, first.text
    count = jobs_of(deployed)
    again = deployed.post({**body, "adapters": ["small/lora", {"ref": "small/dora", "weight": 1.1}]}, key="order-1")
    assert (again.status_code, again.json()["id"], again.headers["location"]) == \
        (202, first.json()["id"], first.headers["location"])
    assert jobs_of(deployed) == count  # no second job
    done = deployed.api.wait(first.json()["id"], FINISHED, timeout=120)
    replayed = deployed.post(body, key="order-1")
    assert replayed.status_code == 202 and replayed.json() == done  # the job as it is now
    other = deployed.post(body, key="order-2")
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]


def test_the_same_key_with_another_body_is_422(deployed: Deployment) -> None:
    assert deployed.post(weighted(1.2), key="order-3").status_code == 202
    body = problem(deployed.post(weighted(1.3), key="order-3"), 422, "Idempotency-Key", "another request body")
    assert body["type"] == PROBLEM + "idempotency-key-reused" and body["field"] == "Idempotency-Key"


def test_keys_belong_to_a_tenant(deployed: Deployment) -> None:
    mine = deployed.post(weighted(1.4), key="shared-key")
    theirs = deployed.post(weighted(1.5), key="shared-key", api=deployed.other_tenant)
    assert mine.status_code == theirs.status_code == 202, theirs.text
    assert theirs.json()["tenant"] == "team-b" and theirs.json()["id"] != mine.json()["id"]


def test_a_request_still_processed_is_409(deployed: Deployment) -> None:
    """The first request is held (deterministically) where it waits for identical submissions: the test takes
    that lock itself. A retry meanwhile is a 409; once the first is answered, the retry gets its answer."""
    body = weighted(1.6)
    earlier = deployed.api.submit(body)
    lock = reuse.lock_name("team-a", earlier["request_digest"])
    answers: list[httpx.Response] = []
    with deployed.store.locked(lock, 60, wait=5):
        first = threading.Thread(target=lambda: answers.append(deployed.post(body, key="slow")))
        first.start()
        wait_for(lambda: deployed.key_taken("team-a", "slow"), 10, "the first request to take its key")
        response = deployed.post(body, key="slow")
        conflict = problem(response, 409, "Idempotency-Key", "still being processed")
        assert conflict["type"] == PROBLEM + "idempotency-key-in-use" and int(response.headers["retry-after"]) > 0
        problem(deployed.post(weighted(1.7), key="slow"), 422, "another request body")
        assert not answers  # the first is still waiting for the lock
    first.join(30)
    assert answers and answers[0].status_code == 202, answers
    answered = answers[0].json()
    assert earlier["id"] in (answered["id"], answered["reused_from"])  # attached to, or sharing, the earlier merge
    replay = deployed.post(body, key="slow")
    assert replay.status_code == 202 and replay.json()["id"] == answered["id"]


def test_a_failed_request_leaves_its_key_free(deployed: Deployment) -> None:
    bad = {"base_model": "small/base", "adapters": ["no/such/adapter"]}
    problem(deployed.post(bad, key="retry-me"), 422, "adapters[0].ref")
    problem(deployed.post(bad, key="retry-me"), 422, "adapters[0].ref")  # processed again, not a 409
    assert deployed.post(weighted(1.8), key="retry-me").status_code == 202  # nothing was kept for it


def test_a_malformed_key_is_422_naming_the_header(deployed: Deployment) -> None:
    for key in ("", "k" * 256, "caf\u00e9"):
        response = deployed.api.http.post("/merge", json=weighted(1.9), headers={
            **bearer("a-submit"), "Idempotency-Key": key.encode()})  # UTF-8 bytes: not printable ASCII
        body = problem(response, 422, "Idempotency-Key")
        assert body["type"] == PROBLEM + "validation-error"
    assert deployed.post(weighted(1.9), key="k" * 255).status_code == 202


def test_the_schema_declares_the_header(deployed: Deployment) -> None:
    operation = deployed.api.http.get("/openapi.json").json()["paths"]["/merge"]["post"]
    header = next(item for item in operation["parameters"] if item["name"] == "Idempotency-Key")
    assert header["in"] == "header" and not header.get("required")
    string = next(kind for kind in header["schema"].get("anyOf", [header["schema"]]) if kind.get("type") == "string")
    assert (string["minLength"], string["maxLength"]) == (1, 255) and {"409", "422"} <= set(operation["responses"])
