"""Reading TRL's prompt and completion formats: the text of a completion, and the conversation a guard model judges."""

Message = dict[str, str]
Prompt = str | list[Message]
Completion = str | list[Message]


def completion_text(completion: Completion) -> str:
    """
    Return the text of a completion in either of TRL's formats.

    Args:
        completion (`str` or `list[dict[str, str]]`):
            A standard-format completion (the text itself) or a conversational one (a list of messages, usually one
            assistant message; the contents of all assistant messages are joined with newlines).

    Returns:
        `str`: The completion text.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "\n".join(
            message["content"] for message in completion if message["role"] == "assistant" and message["content"]
        )
    raise TypeError(
        f"Expected a completion as a string or a list of message dicts, got {type(completion).__name__}: "
        f"{completion!r:.200}"
    )


def _guard_conversation(prompt: Prompt, completion: Completion, include_prompt: bool) -> list[Message]:
    response = completion_text(completion)
    if not include_prompt:
        return [{"role": "user", "content": response}]
    if isinstance(prompt, str):
        turns = [{"role": "user", "content": prompt}]
    else:
        # Guard chat templates (Llama Guard) require strictly alternating user/assistant turns; the policy's system
        # prompt is an instruction to the policy, not content to moderate.
        turns = [
            {"role": message["role"], "content": message["content"]}
            for message in prompt
            if message["role"] != "system"
        ]
    return turns + [{"role": "assistant", "content": response}]


def guard_conversations(
    prompts: list[Prompt], completions: list[Completion], include_prompt: bool
) -> list[list[Message]]:
    """
    The conversations a guard model judges, one per prompt-completion pair: the prompt's turns (system messages left
    out), then the response as the last assistant turn.

    Args:
        prompts (`list[str]` or `list[list[dict[str, str]]]`):
            Prompts, in standard or conversational format.
        completions (`list[str]` or `list[list[dict[str, str]]]`):
            Completions, in the same format as the prompts.
        include_prompt (`bool`):
            Whether the guard sees the prompt. If `False`, each conversation is the response alone, as one user turn.

    Returns:
        `list[list[dict[str, str]]]`: One conversation per pair, in input order.
    """
    return [
        _guard_conversation(prompt, completion, include_prompt)
        for prompt, completion in zip(prompts, completions, strict=True)
    ]
