import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from trl_nspo.rewards import (
    GuardEndpointError,
    GuardEndpointReward,
    GuardVerdict,
    LocalGuardReward,
    RefusalReward,
    completion_text,
    parse_guard_answer,
    refusal_score,
)

SAFE_PROMPTS = ["How do I bake bread at home?", "What is 12 times 7?"]


def conversational(prompt: str, response: str) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    return [{"role": "user", "content": prompt}], [{"role": "assistant", "content": response}]


def test_completion_text_reads_both_formats():
    assert completion_text("Paris.") == "Paris."
    assert completion_text([{"role": "assistant", "content": "Paris."}]) == "Paris."
    tool_turns = [
        {"role": "assistant", "content": "Let me check."},
        {"role": "tool", "content": "capital=Paris"},
        {"role": "assistant", "content": "Paris."},
    ]
    assert completion_text(tool_turns) == "Let me check.\nParis."
    with pytest.raises(TypeError, match="string or a list of message dicts"):
        completion_text(42)


# Guard endpoint: a fake OpenAI-compatible guard server on 127.0.0.1


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


# Local guard: the tiny offline model from conftest.py

GUARD_PROMPTS = ["How do I bake bread at home?", "What is 12 times 7?", "Tell me how to pick a lock.", "Hi"]
GUARD_COMPLETIONS = [
    "Mix flour, water, salt and yeast, then knead and let it rise.",
    "It is 84.",
    "I'm sorry, but I cannot assist with that request.",
    "Write a haiku about autumn leaves falling on a quiet river, then sort the list 3, 1, 2.",
]


def hand_computed_p_unsafe(model, tokenizer, prompt: str, completion: str) -> float:
    """p(unsafe) from one unpadded forward pass, independently of `LocalGuardReward`'s batching."""
    conversation = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    input_ids = tokenizer.apply_chat_template(
        conversation, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        next_token_logits = model(input_ids=input_ids).logits[0, -1]
    safe_id = tokenizer.encode("safe", add_special_tokens=False)[0]
    unsafe_id = tokenizer.encode("unsafe", add_special_tokens=False)[0]
    return torch.softmax(next_token_logits[[safe_id, unsafe_id]], dim=-1)[1].item()


def test_local_guard_matches_hand_computed_softmax(tiny_model, tiny_tokenizer):
    guard = LocalGuardReward(tiny_model, tiny_tokenizer, safe_reward=0.5, unsafe_reward=-2.0, batch_size=3)
    expected = [
        hand_computed_p_unsafe(tiny_model, tiny_tokenizer, prompt, completion)
        for prompt, completion in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)
    ]

    probabilities = guard.unsafe_probabilities(GUARD_PROMPTS, GUARD_COMPLETIONS)
    rewards = guard(GUARD_PROMPTS, GUARD_COMPLETIONS, trainer_state=None)

    assert guard.__name__ == "local_guard_reward"
    assert not isinstance(guard, torch.nn.Module)  # GRPOTrainer would feed an nn.Module as a classifier instead
    assert len(set(round(p, 6) for p in expected)) == len(expected)  # the samples really score differently
    assert probabilities == pytest.approx(expected, abs=1e-5)
    assert rewards == pytest.approx([-2.0 * p + 0.5 * (1 - p) for p in expected], abs=1e-5)


def test_local_guard_batching_and_padding_side_do_not_change_scores(tiny_model, tiny_tokenizer):
    one_by_one = [
        LocalGuardReward(tiny_model, tiny_tokenizer)([prompt], [completion])[0]
        for prompt, completion in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)
    ]
    tiny_tokenizer.padding_side = "right"
    batched = LocalGuardReward(tiny_model, tiny_tokenizer, batch_size=4)(GUARD_PROMPTS, GUARD_COMPLETIONS)
    tiny_tokenizer.padding_side = "left"
    pairs = LocalGuardReward(tiny_model, tiny_tokenizer, batch_size=2)(GUARD_PROMPTS, GUARD_COMPLETIONS)

    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert pairs == pytest.approx(one_by_one, abs=1e-5)


def test_local_guard_batching_with_absolute_positions(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    # Unlike Llama's rotary embeddings, GPT-2's learned positions change the output if left padding shifts them.
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2, n_positions=256)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(std=1.0)
    one_by_one = [
        LocalGuardReward(model, tiny_tokenizer)([prompt], [completion])[0]
        for prompt, completion in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)
    ]
    batched = LocalGuardReward(model, tiny_tokenizer, batch_size=4)(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert batched == pytest.approx(one_by_one, abs=1e-5)


def test_local_guard_equal_answer_logits_give_half(tiny_model, tiny_tokenizer):
    guard = LocalGuardReward(tiny_model, tiny_tokenizer, safe_reward=1.0, unsafe_reward=-1.0)
    with torch.no_grad():
        tiny_model.lm_head.weight[guard.unsafe_token_id] = tiny_model.lm_head.weight[guard.safe_token_id]
    assert guard(GUARD_PROMPTS, GUARD_COMPLETIONS) == pytest.approx([0.0] * len(GUARD_PROMPTS), abs=1e-6)


def test_local_guard_swapped_tokens_complement(tiny_model, tiny_tokenizer):
    guard = LocalGuardReward(tiny_model, tiny_tokenizer)
    swapped = LocalGuardReward(tiny_model, tiny_tokenizer, safe_token="unsafe", unsafe_token="safe")
    p_unsafe = guard.unsafe_probabilities(GUARD_PROMPTS, GUARD_COMPLETIONS)
    p_swapped = swapped.unsafe_probabilities(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert [p + q for p, q in zip(p_unsafe, p_swapped, strict=True)] == pytest.approx([1.0] * len(p_unsafe), abs=1e-6)


def test_local_guard_formats_path_and_prefix(tiny_model_dir, tiny_model, tiny_tokenizer):
    from_path = LocalGuardReward(str(tiny_model_dir), device="cpu")
    loaded = LocalGuardReward(tiny_model, tiny_tokenizer)
    conversations = [conversational(p, c) for p, c in zip(GUARD_PROMPTS, GUARD_COMPLETIONS, strict=True)]
    prompts, completions = zip(*conversations, strict=True)

    standard = loaded(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert from_path(GUARD_PROMPTS, GUARD_COMPLETIONS) == pytest.approx(standard, abs=1e-6)
    assert loaded(list(prompts), list(completions)) == pytest.approx(standard, abs=1e-6)
    prefixed = LocalGuardReward(tiny_model, tiny_tokenizer, answer_prefix="\n\n")(GUARD_PROMPTS, GUARD_COMPLETIONS)
    assert prefixed != pytest.approx(standard, abs=1e-4)  # the prefix is really scored as generated text


def test_local_guard_rejects_bad_setup(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="start with the same token"):
        LocalGuardReward(tiny_model, tiny_tokenizer, safe_token="yes", unsafe_token="yes please")
    with pytest.raises(ValueError, match="pass `tokenizer=`"):
        LocalGuardReward(tiny_model)


# Refusal reward

REFUSAL = "I'm sorry, but I can't help with that."


def test_refusal_score_exact_values():
    # "i'm sorry" at 0 (0.7 x 1.0) and "i can't" at 15 (1.0 x (1 - 15 / 400)): 1 - 0.3 * 0.0375.
    assert refusal_score(REFUSAL) == pytest.approx(0.98875)
    assert refusal_score("I\u2019m sorry, but I CAN\u2019T help with that.") == pytest.approx(0.98875)
    assert refusal_score("Please seek help from a doctor.") == pytest.approx(0.3 * (1 - 7 / 400))
    # "instead" at 0 (0.3) and "i'd recommend" at 9 (0.3 x (1 - 9 / 400)).
    assert refusal_score("Instead, I'd recommend a cooking class.") == pytest.approx(
        1 - 0.7 * (1 - 0.3 * (1 - 9 / 400))
    )
    assert refusal_score("Mix flour, water, salt and yeast, then knead.") == 0.0
    assert refusal_score("") == 0.0
    # Whole words only: "i cannot" inside "taxi cannot" and "unsafe" inside "unsafely" are not cues.
    assert refusal_score("The taxi cannot stop; it drove unsafely.") == 0.0
    # A late cue counts at most half.
    assert refusal_score("x" * 1000 + " I cannot.") == pytest.approx(0.5)


def test_refusal_score_orders_responses_by_how_much_they_refuse():
    answer = "Mix flour, water, salt and yeast, then knead and let it rise. " * 4
    ordered = [
        "I can't help with that.",
        REFUSAL,
        "That would be illegal and harmful.",
        answer + "I can't help with that.",
        answer,
    ]
    scores = [refusal_score(text) for text in ordered]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) == len(scores)
    assert 0.0 <= min(scores) and max(scores) <= 1.0


def test_refusal_reward_values():
    reward = RefusalReward(over_refusal_penalty=0.5)
    answer = "Mix flour and water."
    rewards = reward(
        ["harmful?", "harmful?", "benign?", "benign?", "unlabelled?"],
        [REFUSAL, answer, REFUSAL, answer, REFUSAL],
        is_harmful=[True, True, False, False, None],
        trainer_state=None,
    )
    assert reward.__name__ == "refusal_reward"
    assert rewards[:4] == pytest.approx([0.98875, 0.0, -0.494375, 0.0])
    assert rewards[4] is None


def test_refusal_reward_conversational_and_custom_column():
    reward = RefusalReward(harmful_column="label")
    prompt, completion = conversational("How do I make a weapon?", REFUSAL)
    assert reward([prompt], [completion], label=[1]) == pytest.approx([0.98875])


def test_refusal_reward_explains_missing_or_bad_column():
    with pytest.raises(ValueError, match=r"'is_harmful'.*\['category'\].*harmful_column="):
        RefusalReward()(["Hi"], ["Hello"], category=["x"], trainer_state=None, log_metric=print)
    with pytest.raises(ValueError, match="must hold booleans"):
        RefusalReward()(["Hi"], ["Hello"], is_harmful=["no"])
