"""Job callbacks (Standard Webhooks): signing against the spec's vector, the URL rules, the store's index of
due callbacks on both backends, and delivery end to end from real servers (embedded and distributed) to a
real HTTP receiver on 127.0.0.1 that checks every signature with the README's code and with the reference
library: retries with one id, refusals, every way a job ends, and a server killed mid-delivery. Requests say
`"reuse": false` (but for the test of reuse), so that each runs a merge of its own rather than sharing an earlier
identical one's result."""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from standardwebhooks import Webhook

from adapter_merge.core.jobs import Artifact, JobRecord, JobStatus
from adapter_merge.core.problems import Problem, Problems
from adapter_merge.core.request import MergeRequest
from adapter_merge.core.settings import Settings
from adapter_merge.core.store import JobStore
from adapter_merge.core.webhooks import check_callback_url, event_body, pending_delivery, sign
from tests.loopback import wait_for
from tests.service.conftest import ModelSet
from tests.service.harness import FINISHED, REPO, Api, Proc, running_cluster, service_env, serving, start_server

KEY = secrets.token_bytes(32)
SECRET = "whsec_" + base64.b64encode(KEY).decode()
WEBHOOKS = {
    "MERGE_WEBHOOK_SECRET": SECRET,
    "MERGE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "MERGE_WEBHOOK_TIMEOUT_SECONDS": "1",  # an attempt's lease: 4 s
    "MERGE_WEBHOOK_BACKOFF_SECONDS": "0.05",
    "MERGE_WEBHOOK_RETRY_SECONDS": "3",
}


def readme_verify() -> Callable[[str, dict[str, str], bytes], None]:
    """The receiver example of the README's Webhooks section, run as written."""
    section = (REPO / "README.md").read_text().split("### Webhooks", 1)[1].split("\n### ", 1)[0]
    code = next(block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "def verify(" in block)
    namespace: dict[str, Any] = {}
    exec(code, namespace)
    return namespace["verify"]


# --- signing ----------------------------------------------------------------------------------------------


def test_signature_matches_the_spec_example() -> None:
    """The example of the Standard Webhooks specification (and of its reference libraries' tests)."""
    key = Settings(webhook_secret="whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").webhook_key
    assert sign(key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}') == \
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_secrets_are_written_the_standard_way() -> None:
    raw = secrets.token_bytes(32)
    assert Settings(webhook_secret="whsec_" + base64.b64encode(raw).decode()).webhook_key == raw
    assert Settings(webhook_secret=base64.b64encode(raw).decode()).webhook_key == raw  # the prefix is optional
    assert Settings(webhook_secret="").webhook_key is None
    for bad, why in (("whsec_not base64!", "base64"), ("whsec_" + base64.b64encode(b"short").decode(), "24")):
        with pytest.raises(ValidationError, match=why):
            Settings(webhook_secret=bad)
    assert "whsec" not in repr(Settings(webhook_secret=SECRET))  # never logged by accident


def test_the_readme_receiver_verifies_and_rejects() -> None:
    verify, job = readme_verify(), finished_job(JobStatus.succeeded)
    body, now = event_body(job), int(datetime.now(UTC).timestamp())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(now),
               "webhook-signature": sign(KEY, "msg_1", now, body)}
    verify(SECRET, headers, body)
    Webhook(SECRET).verify(body, headers)  # the reference library agrees
    for tampered in ({**headers, "webhook-id": "msg_2"}, {**headers, "webhook-timestamp": str(now - 1000)}):
        with pytest.raises(ValueError):
            verify(SECRET, tampered, body)
    with pytest.raises(ValueError):
        verify(SECRET, headers, body.replace(b"succeeded", b"failed"))


def test_links_are_absolute_under_the_public_url() -> None:
    """A receiver follows the event's links without knowing the API's address when MERGE_PUBLIC_URL is set."""
    job = finished_job(JobStatus.succeeded).model_copy(update={"artifacts": [
        Artifact(path="model.safetensors", size=2, sha256="0" * 64)]})
    public_url = Settings(public_url=" https://merge.example.com/api/ ").public_url
    assert public_url == "https://merge.example.com/api"
    data = json.loads(event_body(job, public_url))["data"]
    link = f"https://merge.example.com/api/jobs/{job.id}"
    assert data["links"] == {"job": link, "archive": f"{link}/archive"}
    assert [item["url"] for item in data["artifacts"]] == [f"{link}/artifacts/model.safetensors"]
    assert json.loads(event_body(job))["data"]["links"]["job"] == f"/jobs/{job.id}"  # unset: paths on the API
    for bad in ("merge.example.com", "ftp://merge.example.com", "https://merge.example.com/?tenant=a"):
        with pytest.raises(ValidationError, match="MERGE_PUBLIC_URL"):
            Settings(public_url=bad)


# --- URL rules at submission ------------------------------------------------------------------------------


def rules(allowed: str, secret: str | None = SECRET) -> Settings:
    return Settings(webhook_secret=secret, webhook_allowed_hosts=allowed)


@pytest.mark.parametrize(("url", "allowed", "reason"), [
    ("http://127.0.0.1:9/hook", "*", "loopback"),
    ("http://10.1.2.3/hook", "*", "private"),
    ("http://169.254.169.254/latest/meta-data", "*", "link-local"),
    ("http://[::1]:9/hook", "*", "loopback"),
    ("http://[::ffff:127.0.0.1]/hook", "*", "loopback"),
    ("http://[fe80::1]/hook", "*", "link-local"),
    ("http://0.0.0.0/hook", "*", "unspecified"),
    ("http://224.0.0.1/hook", "*", "multicast"),
    ("http://localhost:9/hook", "*", "resolves to 127.0.0.1"),
    ("http://2130706433/hook", "*", "resolves to 127.0.0.1"),  # 127.0.0.1 spelt as one number
    ("http://127.0.0.1:9/hook", "hooks.example.com", "loopback"),
    ("http://localhost/hook", "127.0.0.1", "not among the hosts"),  # a listed address admits no name
    ("http://8.8.8.8/hook", "hooks.example.com", "not among the hosts"),
    ("ftp://hooks.example.com/hook", "*", "http or https"),
    ("http://user:pw@127.0.0.1/hook", "127.0.0.1", "user name"),
    ("http://127.0.0.1:99999/hook", "127.0.0.1", "not a valid URL"),
    ("http://127.0.0.1:0/hook", "127.0.0.1", "invalid port"),
    ("http://@127.0.0.1/hook", "127.0.0.1", "user name"),  # an empty user name, which one parser drops
    ("http://[::1/hook", "*", "not a valid URL"),
    ("http://[::1]x/hook", "::1", "not a valid URL"),
    ("http://" + "a" * 64 + ".example/hook", "*", "invalid host name"),
    ("http://127.0.0.1/hook", "", "MERGE_WEBHOOK_ALLOWED_HOSTS lists no host"),
    ("http://no-such-host.invalid/hook", "*.invalid", "does not resolve"),
])
def test_refused_callback_urls(url: str, allowed: str, reason: str) -> None:
    with pytest.raises(Problem) as refused:
        check_callback_url(url, rules(allowed))
    assert refused.value.kind is Problems.CALLBACK_REFUSED and refused.value.members["field"] == "callback_url"
    assert reason in refused.value.detail and refused.value.detail.startswith("callback_url: ")


@pytest.mark.parametrize(("url", "allowed"), [
    ("http://127.0.0.1:8080/hook", "127.0.0.1"),
    ("http://127.0.0.1:8080/hook", "127.0.0.0/8"),
    ("http://[::1]:8080/hook", "::1"),
    ("http://[::ffff:127.0.0.1]:8080/hook", "127.0.0.1"),
    ("http://localhost:8080/hook", "localhost,127.0.0.1,::1"),
    ("http://LOCALHOST.:8080/hook", "localhost,127.0.0.1,::1"),
    ("http://[::1]:80/hook", "::1"),
    ("https://8.8.8.8/hook", "*"),
])
def test_allowed_callback_urls(url: str, allowed: str) -> None:
    check_callback_url(url, rules(allowed))


def test_no_secret_no_callbacks() -> None:
    with pytest.raises(Problem, match="MERGE_WEBHOOK_SECRET is not set"):
        check_callback_url("http://127.0.0.1/hook", rules("127.0.0.1", secret=None))
    check_callback_url(None, rules("", secret=None))  # no callback asked for: nothing to check


# --- the store: a delivery as a job ends, and the index of due ones ------------------------------------------


def finished_job(status: JobStatus, callback: str | None = "http://127.0.0.1:9/hook") -> JobRecord:
    request = MergeRequest(base_model="base", adapters=["lora"], callback_url=callback)
    job = JobRecord(id=str(uuid.uuid4()), request=request, status=status, finished_at=datetime.now(UTC))
    return job.model_copy(update={"webhook": pending_delivery(job, job.finished_at.timestamp())})


def test_every_way_a_job_ends_makes_its_callback_due(store: JobStore) -> None:
    """The runner's finish, a cancel while queued and the reaper giving up each leave the callback due; a job
    without a callback_url, one put back in the queue and a delivered callback are not in the index."""
    request = MergeRequest(base_model="base", adapters=["lora"], callback_url="http://127.0.0.1:9/hook")
    jobs = {name: JobRecord(id=f"{name}-{uuid.uuid4().hex[:6]}", request=request)
            for name in ("ran", "cancelled", "lost", "requeued")}
    plain = JobRecord(id=f"plain-{uuid.uuid4().hex[:6]}", request=request.model_copy(update={"callback_url": None}))
    for job in [*jobs.values(), plain]:
        store.create(job)
        if job is not jobs["cancelled"]:
            store.claim(job.id, "w", lease_seconds=0 if job is jobs["lost"] else 60)
    store.finish(jobs["ran"].id, 1, JobStatus.succeeded)
    store.finish(plain.id, 1, JobStatus.failed)
    store.finish(jobs["requeued"].id, 1, JobStatus.queued)
    store.request_cancel(jobs["cancelled"].id)
    store.recover(jobs["lost"].id, max_recoveries=0)
    due = store.due_webhooks(store.now() + 1, 10)
    assert sorted(due) == sorted(jobs[name].id for name in ("ran", "cancelled", "lost"))
    assert store.due_webhooks(store.now() - 60, 10) == []  # due from the moment they ended, not before
    lost = store.get(jobs["lost"].id)
    assert lost.status is JobStatus.failed and lost.webhook.state == "pending" and lost.webhook.attempts == 0
    assert store.get(plain.id).webhook is None and store.get(jobs["requeued"].id).webhook is None

    delivered = store.update(jobs["ran"].id, lambda job, now: job.model_copy(
        update={"webhook": job.webhook.model_copy(update={"state": "delivered", "next_attempt_at": None})}))
    assert delivered is not None and jobs["ran"].id not in store.due_webhooks(store.now() + 1, 10)
    store.delete(jobs["cancelled"].id)
    assert store.due_webhooks(store.now() + 1, 10) == [jobs["lost"].id]
    reused = finished_job(JobStatus.succeeded)  # a job created finished, as a reused result is
    store.create(reused)
    assert reused.id in store.due_webhooks(store.now() + 1, 10)


def test_only_one_process_takes_an_attempt(store: JobStore) -> None:
    """Two notifiers on one store: while the first one's attempt is in flight the second finds nothing due; once
    that attempt's lease has passed, the second takes the next attempt (same id) and delivers; the first one's
    late outcome is then not recorded."""
    from adapter_merge.core.notify import Notifier, Outcome

    job = finished_job(JobStatus.succeeded)
    store.create(job)
    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1", webhook_timeout_seconds=0.05)
    first, second = (Notifier(store, settings, KEY) for _ in range(2))
    sent: list[tuple[str, int, str]] = []

    def first_send(current: JobRecord) -> Outcome:
        sent.append(("first", current.webhook.attempts, current.webhook.id))
        assert second.deliver(job.id) is None  # attempt 1 is in flight: due for nobody
        wait_for(lambda: second.deliver(job.id), 10, "the lease of attempt 1 to pass")
        return Outcome(None, "ReadTimeout", retry=True)

    def second_send(current: JobRecord) -> Outcome:
        sent.append(("second", current.webhook.attempts, current.webhook.id))
        return Outcome(200, None, retry=False)

    first.send, second.send = first_send, second_send  # type: ignore[method-assign]
    assert first.deliver(job.id) is None
    hook = store.get(job.id).webhook
    assert sent == [("first", 1, job.webhook.id), ("second", 2, job.webhook.id)]
    assert (hook.state, hook.attempts, hook.last_status) == ("delivered", 2, 200)
    for notifier in (first, second):
        notifier.http.close()


def test_lost_attempts_stop_at_the_retry_time(store: JobStore) -> None:
    """An attempt whose process died records no outcome; once the retry time (and a lease) is over, the callback
    fails instead of being taken over again and again."""
    from adapter_merge.core.notify import Notifier

    job = finished_job(JobStatus.succeeded)
    long_ago = datetime.fromtimestamp(store.now() - 100, UTC)
    store.create(job.model_copy(update={"webhook": job.webhook.model_copy(
        update={"created_at": long_ago, "attempts": 3, "next_attempt_at": long_ago})}))
    notifier = Notifier(store, Settings(webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1",
                                        webhook_retry_seconds=10, webhook_timeout_seconds=1), KEY)
    notifier.send = lambda current: pytest.fail("no attempt past the retry time")  # type: ignore[method-assign]
    try:
        hook = notifier.deliver(job.id).webhook
    finally:
        notifier.http.close()
    assert (hook.state, hook.attempts) == ("failed", 3) and "recorded no outcome" in hook.last_error
    assert job.id not in store.due_webhooks(store.now(), 10)


def test_a_receiver_that_does_not_answer_holds_up_one_sender(store: JobStore) -> None:
    """A process's senders work side by side: while one attempt hangs, the next due callback is delivered."""
    from adapter_merge.core.notify import Notifier, Outcome

    hanging, answering = finished_job(JobStatus.succeeded), finished_job(JobStatus.failed)
    for job in (hanging, answering):
        store.create(job)
    release = threading.Event()

    def send(current: JobRecord) -> Outcome:
        if current.id == hanging.id:
            release.wait(30)
        return Outcome(200, None, retry=False)

    settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts="127.0.0.1", webhook_concurrency=2,
                        poll_seconds=0.05)
    notifier = Notifier(store, settings, KEY)
    notifier.send = send  # type: ignore[method-assign]
    notifier.start()
    try:
        wait_for(lambda: store.get(answering.id).webhook.state == "delivered", 10, "the answering receiver's callback")
        assert store.get(hanging.id).webhook.state == "pending"
        release.set()
        wait_for(lambda: store.get(hanging.id).webhook.state == "delivered", 10, "the hanging receiver's callback")
    finally:
        release.set()
        notifier.stop()


# --- delivery end to end --------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def event(self) -> dict[str, Any]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that answers each path with its script of statuses (the last one repeats)
    and keeps every request it got; every signature is checked as it arrives."""

    url: str
    scripts: dict[str, list[int]] = field(default_factory=dict)
    got: list[Received] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    hold: dict[str, threading.Event] = field(default_factory=dict)
    """Paths whose first request is held open until the event is set."""

    def path(self, *statuses: int) -> str:
        path = f"/hook/{uuid.uuid4().hex[:8]}"
        self.scripts[path] = list(statuses)
        return path

    def requests(self, path: str) -> list[Received]:
        return [request for request in self.got if request.path == path]

    def wait(self, path: str, count: int, timeout: float = 60) -> list[Received]:
        return wait_for(lambda: len(self.requests(path)) >= count and self.requests(path), timeout,
                        lambda: f"{count} callbacks at {path}; got {len(self.requests(path))}")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    verify = readme_verify()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["content-length"]))
            headers = {name.lower(): value for name, value in self.headers.items()}
            try:
                verify(SECRET, headers, body)
                Webhook(SECRET).verify(body, headers)
            except Exception as error:
                state.bad.append(f"{self.path}: {error!r}")
            held = state.hold.pop(self.path, None)
            state.got.append(Received(self.path, headers, body))
            if held is not None:
                held.wait(30)
            script = state.scripts.get(self.path, [404])
            status = script.pop(0) if len(script) > 1 else script[0]
            self.send_response(status)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state = Receiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    assert not state.bad, state.bad


def test_each_attempt_checks_the_url_again(store: JobStore, receiver: Receiver) -> None:
    """The delivery resolves the name again and connects to the address it checked, with the URL's own Host
    header; a name that resolves to an address no longer allowed (DNS rebinding, here: the allow-list no longer
    lists the address) is refused without a request, and the callback fails at once."""
    from adapter_merge.core.notify import Notifier

    port = receiver.url.rsplit(":", 1)[1]
    path = receiver.path(200)
    job = finished_job(JobStatus.succeeded, callback=f"http://localhost:{port}{path}")
    store.create(job)
    for allowed, state in (("localhost", "failed"), ("localhost,127.0.0.1", "delivered")):
        settings = Settings(webhook_secret=SECRET, webhook_allowed_hosts=allowed)
        notifier = Notifier(store, settings, KEY)
        try:
            hook = notifier.deliver(job.id).webhook
        finally:
            notifier.http.close()
        assert hook.state == state, hook
        if state == "failed":
            assert "resolves to 127.0.0.1, a loopback address" in hook.last_error and not receiver.requests(path)
            store.update(job.id, lambda current, now: current.model_copy(update={"webhook": current.webhook.model_copy(
                update={"state": "pending", "next_attempt_at": datetime.fromtimestamp(now, UTC)})}))
    [call] = receiver.requests(path)
    assert call.headers["host"] == f"localhost:{port}" and call.headers["webhook-id"] == job.webhook.id


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("webhooks-data")


@pytest.fixture(scope="module")
def server(models: ModelSet, data_dir: Path) -> Iterator[tuple[Proc, Api]]:
    with serving(service_env(data_dir, models.root, **WEBHOOKS), data_dir / "server.log") as running:
        yield running


@pytest.fixture
def api(server: tuple[Proc, Api]) -> Api:
    return server[1]


def delivered_state(job: dict) -> bool:
    return job["webhook"] is not None and job["webhook"]["state"] != "pending"


def calling_back(request: dict, url: str) -> dict:
    """`request` with a callback, merged afresh (not answered from an earlier identical job)."""
    return {**request, "reuse": False, "callback_url": url}


def notified(api: Api, request: dict, url: str) -> dict:
    """Submit `request` with a callback to `url`; the job once its callback is delivered or failed."""
    return api.wait(api.submit(calling_back(request, url))["id"], delivered_state, 60)


def test_retried_until_delivered_with_one_id(api: Api, receiver: Receiver, small_request: dict) -> None:
    """500 twice, then 200: three attempts, one webhook-id, the same body; the job says delivered, attempts 3."""
    path = receiver.path(500, 500, 200)
    job = notified(api, small_request, receiver.url + path)
    assert job["status"] == "succeeded", job["error"]
    hook = job["webhook"]
    assert hook["state"] == "delivered" and hook["attempts"] == 3 and hook["last_status"] == 200, hook
    assert hook["delivered_at"] is not None and hook["next_attempt_at"] is None
    calls = receiver.requests(path)
    assert len(calls) == 3 and {call.headers["webhook-id"] for call in calls} == {hook["id"]}
    assert len({call.body for call in calls}) == 1
    event = calls[0].event
    assert event["type"] == "job.succeeded" and event["data"]["id"] == job["id"]
    assert event["data"]["request_digest"] == job["request_digest"]
    assert {(item["path"], item["sha256"], item["url"]) for item in event["data"]["artifacts"]} == \
        {(item["path"], item["sha256"], item["url"]) for item in job["artifacts"]}
    assert event["data"]["links"] == {"job": f"/jobs/{job['id']}", "archive": job["archive_url"]}


def test_a_reused_result_notifies(api: Api, receiver: Receiver, small_request: dict) -> None:
    """A job answered from an earlier identical one is created succeeded, and gets its callback all the same."""
    earlier = notified(api, small_request, receiver.url + receiver.path(200))
    path = receiver.path(200)
    job = api.wait(api.submit({**small_request, "callback_url": receiver.url + path})["id"], delivered_state, 60)
    assert job["reused_from"] is not None and job["webhook"]["state"] == "delivered", job
    [call] = receiver.requests(path)
    assert call.event["type"] == "job.succeeded" and call.event["data"]["reused_from"] == job["reused_from"]
    assert call.event["data"]["request_digest"] == earlier["request_digest"]


def test_a_4xx_fails_without_retry(api: Api, receiver: Receiver, small_request: dict) -> None:
    path = receiver.path(410)
    job = notified(api, small_request, receiver.url + path)
    hook = job["webhook"]
    assert (hook["state"], hook["attempts"], hook["last_status"]) == ("failed", 1, 410), hook
    assert len(receiver.requests(path)) == 1


def test_retries_end_with_the_retry_time(api: Api, receiver: Receiver, small_request: dict) -> None:
    path = receiver.path(503)
    job = notified(api, small_request, receiver.url + path)
    hook = job["webhook"]
    assert hook["state"] == "failed" and hook["last_status"] == 503 and "gave up" in hook["last_error"], hook
    assert hook["attempts"] >= 3 and len(receiver.requests(path)) == hook["attempts"]
    ended = datetime.fromisoformat(hook["created_at"])
    last = max(datetime.fromtimestamp(int(call.headers["webhook-timestamp"]), UTC) for call in receiver.requests(path))
    assert (last - ended).total_seconds() <= float(WEBHOOKS["MERGE_WEBHOOK_RETRY_SECONDS"]) + 1


def test_cancelled_and_failed_jobs_notify(api: Api, receiver: Receiver, models: ModelSet, big_request: dict,
                                          small_request: dict) -> None:
    """With the one worker busy: a queued job cancelled through the API, and a job whose adapter folder is gone
    by the time it runs (it fails), each get their callback; so does the running job cancelled afterwards."""
    running = api.submit(calling_back(big_request, receiver.url + (cancelled_running := receiver.path(200))))
    api.wait(running["id"], ["running"], timeout=60)
    queued = api.submit(calling_back(small_request, receiver.url + (cancelled := receiver.path(200))))
    shutil.copytree(models.root / "small/lora", models.root / "small/doomed")
    doomed = api.submit({**small_request, "adapters": ["small/doomed"], "reuse": False,
                         "callback_url": receiver.url + (failed := receiver.path(204))})
    shutil.rmtree(models.root / "small/doomed")
    assert api.http.post(f"/jobs/{queued['id']}/cancel").json()["status"] == "cancelled"
    [call] = receiver.wait(cancelled, 1)
    assert call.event["type"] == "job.cancelled" and call.event["data"]["artifacts"] == []
    api.http.post(f"/jobs/{running['id']}/cancel")
    ended = api.wait(running["id"], FINISHED, 60)["status"]  # cancelled, unless it had just finished
    assert receiver.wait(cancelled_running, 1)[0].event["type"] == f"job.{ended}"
    [call] = receiver.wait(failed, 1)
    job = api.wait(doomed["id"], delivered_state, 60)
    assert job["status"] == "failed" and job["webhook"]["state"] == "delivered" and job["webhook"]["last_status"] == 204
    assert call.event["type"] == "job.failed" and call.event["data"]["error"] == job["error"]
    assert call.event["data"]["error"]["field"] == "adapters[0].ref"


def test_refused_callbacks_over_the_wire(models: ModelSet, tmp_path: Path, small_request: dict) -> None:
    """A server that would call any host by name still refuses loopback, private and link-local addresses, and
    names resolving to them, at submission, and malformed URLs too: 422 callback-refused naming callback_url;
    nothing is queued."""
    env = service_env(tmp_path / "data", models.root, **{**WEBHOOKS, "MERGE_WEBHOOK_ALLOWED_HOSTS": "*"})
    with serving(env, tmp_path / "server.log") as (_, api):
        for url in ("http://127.0.0.1:8080/hook", "http://10.0.0.7/hook", "http://169.254.169.254/latest",
                    "http://[::1]:8080/hook", "http://localhost:8080/hook", "http://[::1/hook", "ftp://x/hook"):
            response = api.http.post("/merge", json={**small_request, "callback_url": url})
            assert response.status_code == 422, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            body = response.json()
            assert body["type"].endswith(":callback-refused") and body["field"] == "callback_url", body
        assert api.http.get("/jobs").json()["total"] == 0


def test_a_server_killed_mid_delivery(models: ModelSet, tmp_path: Path, receiver: Receiver,
                                      small_request: dict) -> None:
    """The receiver holds the first attempt open while the server (API and worker) is SIGKILLed; the next
    server on the same data dir takes the callback over once the attempt's lease has passed and delivers it,
    with the same id: at least once, whatever dies."""
    env = service_env(tmp_path / "data", models.root, **WEBHOOKS)
    path = receiver.path(200)
    receiver.hold[path] = release = threading.Event()
    proc, api = start_server(env, tmp_path / "first.log")
    try:
        job = api.submit(calling_back(small_request, receiver.url + path))
        [first] = receiver.wait(path, 1)
    finally:
        api.close()
        proc.kill_group()
        proc.reap_group()
        release.set()
    proc, api = start_server(env, tmp_path / "second.log")
    try:
        done = api.wait(job["id"], delivered_state, 60)
        assert done["webhook"]["state"] == "delivered" and done["webhook"]["attempts"] == 2, done["webhook"]
        calls = receiver.requests(path)
        assert len(calls) == 2 and calls[1].headers["webhook-id"] == first.headers["webhook-id"]
        assert calls[1].body == first.body
    finally:
        api.close()
        assert proc.stop() == 0, proc.tail()


def test_distributed_mode_delivers_once(models: ModelSet, tmp_path: Path, receiver: Receiver,
                                        redis_namespace: dict[str, str], small_request: dict,
                                        big_request: dict) -> None:
    """API and Celery worker both look for due callbacks in Redis; exactly one of them sends each. With the API
    gone, the worker alone delivers the callback of the job it was running."""
    env = service_env(tmp_path / "data", models.root, **WEBHOOKS, **redis_namespace)
    with running_cluster(tmp_path, env, [env]) as (server, api, [worker]):
        path = receiver.path(200)
        job = notified(api, small_request, receiver.url + path)
        assert job["status"] == "succeeded" and job["webhook"]["state"] == "delivered", job
        assert job["webhook"]["attempts"] == 1 and len(receiver.requests(path)) == 1
        assert receiver.requests(path)[0].event["data"]["id"] == job["id"]

        path = receiver.path(200)
        running = api.submit(calling_back(big_request, receiver.url + path))
        api.wait(running["id"], ["running"], timeout=60)
        assert server.stop() == 0, server.tail()
        [call] = receiver.wait(path, 1)
        assert call.event["data"]["id"] == running["id"] and call.event["type"] == "job.succeeded"
        worker.wait_for_log(f"job {running['id']}: callback {call.headers['webhook-id']} attempt 1: HTTP 200; "
                            "delivered", 10)
