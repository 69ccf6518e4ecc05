"""scripts/first_run.sh: which models it waits for and how it reads the gateway's answers.

The script is sourced for its functions (sourcing defines them and runs nothing), and they are fed
answers shaped as the gateway gives them; the whole script (a fresh clone's `make run`, minutes of
CPU) is not run here.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "first_run.sh"

# /v1/models as the stack lists the bundled models: the base model Gemma before the chat model.
MODELS = {
    "object": "list",
    "data": [
        {"id": "all-minilm-l6-v2", "task": "embedding", "state": "READY"},
        {"id": "gemma-3-270m", "task": "generation", "state": "READY"},
        {"id": "smollm2-135m-instruct", "task": "generation", "state": "LOADING"},
    ],
}
CHAT = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "length"}]}


def _run(command: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", "-c", f". {SCRIPT}; {command}"], input=stdin, capture_output=True, text=True, check=False
    )


def test_sourcing_the_script_defines_its_functions_and_runs_nothing() -> None:
    done = _run("type main first_model_of lists_model is_chat_answer > /dev/null && echo defined")
    assert (done.returncode, done.stdout, done.stderr) == (0, "defined\n", "")


def test_chat_is_timed_on_the_chat_model_the_readme_tells_users_to_use() -> None:
    chat_model = _run('echo "$CHAT_MODEL"').stdout.strip()
    assert chat_model == "smollm2-135m-instruct"
    readme = (ROOT / "README.md").read_text()
    assert re.search(rf'/v1/chat/completions -d \'{{"model":"{chat_model}"', readme), "the README's chat example"
    assert _run("lists_model smollm2-135m-instruct", json.dumps(MODELS)).stdout == "yes\n"
    # The first generation model listed is Gemma, a base model: not the one to time a chat with.
    assert _run("first_model_of generation", json.dumps(MODELS)).stdout == "gemma-3-270m\n"


def test_a_model_not_listed_yet_or_a_gateway_not_answering_yet() -> None:
    assert _run("lists_model smollm2-135m-instruct", json.dumps({"data": MODELS["data"][:2]})).stdout == "no\n"
    assert _run("lists_model smollm2-135m-instruct", "").stdout == "no\n"
    assert _run("first_model_of embedding", "").stdout == "\n"


def test_only_a_chat_completion_with_an_answer_counts() -> None:
    assert _run("is_chat_answer", json.dumps(CHAT)).returncode == 0
    tool_call = {"choices": [{"message": {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}}]}
    assert _run("is_chat_answer", json.dumps(tool_call)).returncode == 0
    error = {"error": {"message": "gemma-3-270m has no chat template", "type": "invalid_request_error"}}
    completion = {"choices": [{"index": 0, "text": "Hello", "finish_reason": "length"}]}
    for answer in (json.dumps(error), json.dumps(completion), "", "<html>502</html>"):
        assert _run("is_chat_answer", answer).returncode == 1, answer


def test_only_an_embedding_with_a_vector_counts() -> None:
    assert _run("is_embeddings_answer", json.dumps({"data": [{"embedding": [0.1, 0.2]}]})).returncode == 0
    assert _run("is_embeddings_answer", json.dumps({"data": []})).returncode == 1


def test_each_report_line_names_what_was_timed() -> None:
    done = _run('report_line "chat answered ($CHAT_MODEL, /v1/chat/completions)" 184')
    assert done.stdout == f"  {'chat answered (smollm2-135m-instruct, /v1/chat/completions)':<60}   184 s\n"
