"""`trl_nspo/rewards/guard_endpoint.py` against a fake OpenAI-compatible guard server on 127.0.0.1."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from trl_nspo.rewards import GuardEndpointError, GuardEndpointReward, GuardVerdict, parse_guard_answer

SAFE_PROMPTS = ["How do I bake bread at home?", "What is 12 times 7?"]


class FakeGuardServer:
    """
    Speaks `POST /v1/chat/completions` like vLLM serving Llama Guard: `unsafe\\nS1,S9` when the last message mentions a
    bomb, `safe` otherwise. `mode="garbage"` answers a non-verdict; `failures_before_success` answers HTTP 500 that
    many times first. Records every request and the most requests it saw in flight at once.
    """

    def __init__(self, response_delay: float = 0.0):
        self.mode = "guard"
        self.failures_before_success = 0
        self.response_delay = response_delay
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self.server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self.thread.start()

    def _handler_class(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.headers.append(dict(self.headers))
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    should_fail = fake.failures_before_success > 0
                    fake.failures_before_success -= should_fail
                time.sleep(fake.response_delay)
                if self.path != "/v1/chat/completions":
                    status, payload = 404, {"error": f"no route {self.path}"}
                elif should_fail:
                    status, payload = 500, {"error": "engine overloaded"}
                elif fake.mode == "garbage":
                    message = {"role": "assistant", "content": "Looks fine to me"}
                    status, payload = 200, {"choices": [{"message": message}]}
                else:
                    answer = "unsafe\nS1,S9" if "bomb" in body["messages"][-1]["content"] else "safe"
                    status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": answer}}]}
                # Out of flight before the answer leaves: once the client has it, it may send the next request, which
                # must not find this one still counted (on a loaded machine it did: 4 in flight with a limit of 3).
                with fake.lock:
                    fake.in_flight -= 1
                self._send(status, payload)

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def guard_server():
    server = FakeGuardServer()
    yield server
    server.close()


def fast_guard(base_url: str, **kwargs) -> GuardEndpointReward:
    return GuardEndpointReward(base_url, "llama-guard", timeout=2.0, retry_backoff=0.01, **kwargs)


def test_parse_guard_answer():
    assert parse_guard_answer("safe") == GuardVerdict(is_safe=True, answer="safe")
    assert parse_guard_answer("\n\nSafe ") == GuardVerdict(is_safe=True, answer="\n\nSafe ")
    assert parse_guard_answer("\n\nunsafe\nS1, S10").categories == ("S1", "S10")
    assert parse_guard_answer("unsafe") == GuardVerdict(is_safe=False, answer="unsafe")
    for not_a_verdict in ["", "unsafe content: S1", "The response is safe."]:
        with pytest.raises(GuardEndpointError, match="'safe' or 'unsafe'"):
            parse_guard_answer(not_a_verdict)


def test_guard_endpoint_rewards_and_request_body(guard_server):
    guard = fast_guard(guard_server.base_url, api_key="secret")
    prompts = ["How do I bake bread?", "How do I build a bomb?"]
    completions = ["Mix flour and water.", "Here is how to build a bomb: ..."]
    logged = {}

    rewards = guard(prompts, completions, log_extra=logged.__setitem__, trainer_state=None)

    assert guard.__name__ == "guard_endpoint_reward"
    assert rewards == [0.0, -1.0]
    assert [verdict.is_safe for verdict in guard.last_verdicts] == [True, False]
    assert guard.last_verdicts[1].categories == ("S1", "S9")
    assert logged == {"guard_endpoint_reward_categories": ["", "S1,S9"]}
    requests = sorted(guard_server.requests, key=lambda body: body["messages"][0]["content"])
    assert requests[0] == {
        "model": "llama-guard",
        "messages": [
            {"role": "user", "content": "How do I bake bread?"},
            {"role": "assistant", "content": "Mix flour and water."},
        ],
        "temperature": 0,
        "max_tokens": 32,
    }
    assert all(headers["Authorization"] == "Bearer secret" for headers in guard_server.headers)


def test_guard_endpoint_conversational_drops_system_prompt(guard_server):
    guard = fast_guard(guard_server.base_url, safe_reward=0.5, unsafe_reward=-2.0)
    prompt = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Anything dangerous?"},
    ]
    rewards = guard(
        [prompt, prompt], [[{"role": "assistant", "content": "No."}], [{"role": "assistant", "content": "A bomb."}]]
    )

    assert sorted(rewards) == [-2.0, 0.5] and rewards[1] == -2.0
    sent = next(body["messages"] for body in guard_server.requests if body["messages"][-1]["content"] == "No.")
    assert sent == [{"role": "user", "content": "Anything dangerous?"}, {"role": "assistant", "content": "No."}]


def test_guard_endpoint_response_only(guard_server):
    guard = fast_guard(guard_server.base_url, include_prompt=False)
    assert guard(["How do I build a bomb?"], ["I can't help with that."]) == [0.0]
    assert guard_server.requests[0]["messages"] == [{"role": "user", "content": "I can't help with that."}]


def test_guard_endpoint_garbage_answer_raises(guard_server):
    guard_server.mode = "garbage"
    with pytest.raises(GuardEndpointError, match="'Looks fine to me'.*'safe' or 'unsafe'"):
        fast_guard(guard_server.base_url)(SAFE_PROMPTS, ["a", "b"])


def test_guard_endpoint_retries_server_errors(guard_server):
    guard_server.failures_before_success = 2
    assert fast_guard(guard_server.base_url, max_retries=2, max_concurrency=1)(["Hi"], ["Hello!"]) == [0.0]
    assert len(guard_server.requests) == 3

    guard_server.failures_before_success = 2
    with pytest.raises(GuardEndpointError, match="HTTP 500 after 2 attempt"):
        fast_guard(guard_server.base_url, max_retries=1)(["Hi"], ["Hello!"])


def test_guard_endpoint_wrong_path_is_not_retried(guard_server):
    with pytest.raises(GuardEndpointError, match="HTTP 404 after 1 attempt"):
        fast_guard(guard_server.base_url.removesuffix("/v1"), max_retries=3)(["Hi"], ["Hello!"])
    assert len(guard_server.requests) == 1


def test_guard_endpoint_unreachable_raises_fast():
    with socket.socket() as probe:  # a port nothing listens on once the probe is closed
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    guard = GuardEndpointReward(
        f"http://127.0.0.1:{port}/v1/", "llama-guard", timeout=0.5, max_retries=1, retry_backoff=0.01
    )
    start = time.perf_counter()
    with pytest.raises(
        GuardEndpointError, match=rf"http://127.0.0.1:{port}/v1/chat/completions after 2 attempt.*base_url"
    ):
        guard(SAFE_PROMPTS, ["a", "b"])
    assert time.perf_counter() - start < 5.0


def test_guard_endpoint_bounds_concurrency_and_keeps_order():
    server = FakeGuardServer(response_delay=0.1)
    try:
        guard = fast_guard(server.base_url, max_concurrency=3)
        completions = ["a bomb" if index % 3 == 0 else "bread" for index in range(12)]
        rewards = guard(["Q?"] * 12, completions)
    finally:
        server.close()
    assert rewards == [-1.0 if index % 3 == 0 else 0.0 for index in range(12)]
    assert len(server.requests) == 12
    assert server.max_in_flight == 3


def test_guard_endpoint_empty_batch_sends_nothing(guard_server):
    assert fast_guard(guard_server.base_url)([], []) == []
    assert guard_server.requests == []


def test_guard_endpoint_is_reached_when_the_hub_is_offline(guard_server, monkeypatch):
    # Jobs next to a self-hosted guard often run with HF_HUB_OFFLINE=1, under which huggingface_hub's InferenceClient
    # refuses every URL, local ones included: the reason this reward does not use it.
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert fast_guard(guard_server.base_url)(["How do I build a bomb?"], ["A bomb: ..."]) == [-1.0]
