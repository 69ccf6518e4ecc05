"""What the python-backend LLM models (llamacpp, ortgenai) share: the tensor convention of Triton's
own LLM backends (vLLM, TensorRT-LLM), so the inference service talks to them and to a production
vLLM/TensorRT-LLM model the same way, and the Triton plumbing around it, which the decoupled Piper
voice model (piper/) uses too.

The builders copy this file next to each model.py, as they copy the model's text module: a
python-backend model imports only from its own version folder.
"""

try:
    import triton_python_backend_utils as pb_utils
except ImportError:  # the text modules import RequestError from here, also in tests without a stub
    pb_utils = None

INPUTS = [
    {"name": "text_input", "data_type": "TYPE_STRING", "dims": [1]},
    {"name": "stream", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "sampling_parameters", "data_type": "TYPE_STRING", "dims": [1], "optional": True},
    {"name": "exclude_input_in_output", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_finish_reason", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_num_input_tokens", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
    {"name": "return_num_output_tokens", "data_type": "TYPE_BOOL", "dims": [1], "optional": True},
]
OUTPUTS = [
    {"name": "text_output", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "finish_reason", "data_type": "TYPE_STRING", "dims": [-1]},
    {"name": "num_input_tokens", "data_type": "TYPE_UINT32", "dims": [1]},
    {"name": "num_output_tokens", "data_type": "TYPE_UINT32", "dims": [-1]},
]


class RequestError(ValueError):
    """A request that can never succeed as sent; answered with INVALID_ARG and this message."""


def complete_config(auto_complete_model_config, inputs: list[dict], outputs: list[dict]):
    """Adds the tensors a config.pbtxt leaves out, and makes the model decoupled and unbatched."""
    config = auto_complete_model_config.as_dict()
    have_inputs = {t["name"] for t in config.get("input", [])}
    have_outputs = {t["name"] for t in config.get("output", [])}
    for tensor in inputs:
        if tensor["name"] not in have_inputs:
            auto_complete_model_config.add_input(tensor)
    for tensor in outputs:
        if tensor["name"] not in have_outputs:
            auto_complete_model_config.add_output(tensor)
    # Decoupled: one request streams many responses, sent from the model's own threads. The
    # engines batch (or schedule) requests themselves; Triton's batching would not help.
    auto_complete_model_config.set_model_transaction_policy({"decoupled": True})
    auto_complete_model_config.set_max_batch_size(0)
    return auto_complete_model_config


def scalar(request, name: str, default=None):
    """The single value of an optional [1]-shaped input tensor, or `default` when it is absent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    return tensor.as_numpy().reshape(-1)[0]


def read_prompt(request) -> str:
    """The `text_input` tensor as text; it is the one input every request must have."""
    text = scalar(request, "text_input")
    if text is None:
        raise RequestError("text_input is required")
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


def refuse_unfittable_prompt(prompt: str, context_tokens: int, longest_token_bytes: int) -> None:
    """Refuses, before it is tokenised, a prompt that cannot fit the context: no token stands for
    more bytes than the vocabulary's longest one, so a prompt of N bytes has at least
    N / longest tokens. Twice that is allowed, for tokenizers that drop characters (control
    characters, repeated whitespace). Tokenising a 10 MB prompt only to refuse it took the model's
    execute thread ~20 s, while every other request of the model waited."""
    size = len(prompt.encode("utf-8"))  # milliseconds, even for megabytes
    if size > 2 * context_tokens * longest_token_bytes:
        raise RequestError(
            f"the prompt is {size} bytes, at least {size // longest_token_bytes} tokens; the context holds "
            f"{context_tokens}"
        )


def longest_token_bytes(pieces) -> int:
    """The most bytes one token of the vocabulary stands for, from its pieces (bytes or text)."""
    return max((len(p.encode("utf-8")) if isinstance(p, str) else len(p) for p in pieces), default=1) or 1


def error(message: str, code):
    # Over a gRPC stream Triton (2.51) delivers only the message of a response's error, not its
    # code, so the code leads the message where a client can read it back. (The names are looked
    # up here, not at import: the stub adds TritonError to pb_utils only after
    # auto_complete_config has imported the model.)
    names = {getattr(pb_utils.TritonError, n): n for n in ("INVALID_ARG", "CANCELLED", "UNAVAILABLE", "INTERNAL")}
    return pb_utils.TritonError(f"[{names.get(code, 'INTERNAL')}] {message}", code)


def send_error(sender, message: str, code) -> None:
    """Answers a request with an error from the calling thread (for requests refused in execute)."""
    response = pb_utils.InferenceResponse(error=error(message, code))
    sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)


def stop_prefix_length(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the start of a stop string, but not all of one.

    That much text must be held back: the next tokens may complete the stop string, which must
    never reach the client."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if text.endswith(stop[:n]):
                best = n
                break
    return best
