"""Request and response bodies of the OpenAI-compatible API, as Dify's provider sends and reads them."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

# A token id of the model's own tokenizer; the inference service checks it against the vocabulary.
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
ModelName = Annotated[
    str,
    Field(min_length=1, max_length=256, description="A model name from GET /v1/models.", examples=["all-minilm-l6-v2"]),
]

Texts = Annotated[list[str], Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
TokenIdLists = Annotated[list[TokenIds], Field(min_length=1)]


class EmbeddingsRequest(BaseModel):
    # Clients send fields this API does not use (user, dimensions); they are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: ModelName
    input: str | Texts | TokenIds | TokenIdLists = Field(
        description="A text, a list of texts, token ids, or a list of token-id lists. Texts longer than the "
        "model accepts are cut to its limit (MODELPLANE_INFERENCE_TRUNCATION=error refuses them instead). "
        "Any number of inputs up to the gateway's batch limit; large batches are split across calls.",
        examples=[["The quick brown fox.", "A second text."]],
    )
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="`float` lists, or `base64` of little-endian float32."
    )


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingsUsage


class RerankDocumentIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    text: str


class RerankRequest(BaseModel):
    """Jina's and Cohere's rerank request, as Dify's OpenAI-API-compatible provider sends it."""

    # Clients send fields this API does not use (max_chunks_per_doc, rank_fields); they are ignored.
    model_config = ConfigDict(extra="allow")

    model: ModelName
    query: str = Field(description="The query the documents are scored against.", examples=["What is Triton?"])
    documents: list[str | RerankDocumentIn] = Field(
        min_length=1,
        description="The documents to score: strings, or objects with a `text` field.",
        examples=[["Triton serves models.", "Bananas are yellow."]],
    )
    top_n: int | None = Field(
        default=None, ge=0, description="How many of the best to return; absent or null: all (0: none)."
    )
    return_documents: bool = Field(default=True, description="Whether each result carries its document's text.")


class RerankResultDocument(BaseModel):
    text: str


class RerankResult(BaseModel):
    index: int = Field(description="Position of the document in the request.")
    relevance_score: float = Field(ge=0.0, le=1.0, description="Relevance in [0, 1]; higher is more relevant.")
    document: RerankResultDocument | None = Field(default=None, description="Present when return_documents is true.")


class RerankUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class RerankResponse(BaseModel):
    id: str = Field(description="The request id.")
    object: Literal["list"] = "list"
    model: str
    results: list[RerankResult] = Field(description="Most relevant first.")
    usage: RerankUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelplane"
    task: str = Field(description="embedding, rerank, generation, speech2text or tts.")
    state: str = Field(description="Lifecycle state: READY, or a state from which a request loads it.")
    context_length: int | None = Field(
        default=None, description="Tokens of context a generation model is served with (known once it is staged)."
    )
    capabilities: list[str] | None = Field(
        default=None,
        description="What a generation model can do besides text: `tools`, `json_schema`, `reasoning`, `vision` "
        "(known once it is staged).",
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong and what to do about it.")
    type: str
    code: str = Field(description="A stable, machine-readable code.")
    param: str | None = Field(default=None, description="The request field at fault, when one is.")
    state: str | None = Field(default=None, description="For 409: the lifecycle state the model is in.")


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """The `responses` of a route: these statuses, each with the error body."""
    return {status: {"model": ErrorBody} for status in sorted(statuses)}


# The statuses every API route can answer with, whatever it does: the access middleware's refusals
# (401, 413, 429), a malformed body (422), the deadline (504), an unexpected failure (500).
COMMON_ERRORS = (401, 413, 422, 429, 500, 504)


# Chat and completions ------------------------------------------------------------------------


class TextPart(BaseModel):
    """One part of a message's content; only text parts are understood by text models."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(description="`text`; other part types (images, audio) are refused with 400.")
    text: str = ""


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=256)
    arguments: str | dict = Field(default="{}", description="The arguments, a JSON object as text.")


class ToolCallIn(BaseModel):
    """An assistant's earlier tool call, sent back in the conversation."""

    model_config = ConfigDict(extra="allow")

    id: str = ""
    type: str = "function"
    function: FunctionCall


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = Field(
        default=None, description="A text, or a list of text parts that are joined."
    )
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = Field(default=None, description="An assistant message's tool calls.")
    tool_call_id: str | None = Field(default=None, description="A `tool` message's call id (required there).")
    function_call: FunctionCall | None = Field(default=None, description="The legacy form of one tool call.")


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(max_length=256)
    description: str | None = None
    parameters: object | None = Field(default=None, description="A JSON schema of the arguments.")


class ToolIn(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = Field(default="function", description="`function`; tools of other types are ignored.")
    function: FunctionDefinition | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = Field(
        default=False, description='Send a last chunk with `"choices": []` and the usage before `[DONE]`.'
    )


class SamplingFields(BaseModel):
    """The sampling fields chat and completions share. Fields this API does not use (tools,
    response_format, logit_bias, user, ...) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: ModelName
    max_tokens: int | None = Field(
        default=None, ge=1, description="Most tokens to generate; lowered to the gateway's limit and the context."
    )
    max_completion_tokens: int | None = Field(default=None, ge=1, description="The newer name of max_tokens.")
    temperature: float | None = Field(default=None, ge=0.0, le=2.0, description="0 is greedy decoding.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(
        default=None, ge=-1, le=2**31 - 1, description="Not OpenAI's; llama.cpp and vLLM clients send it. 0 or -1: off."
    )
    seed: int | None = Field(default=None, ge=0, le=2**32 - 2, description="The same seed gives the same output.")
    stop: str | list[str] | None = Field(default=None, description="Up to 4 strings that end the text (not returned).")
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, description="Not OpenAI's; 1 means none.")
    n: int | None = Field(default=None, ge=1, description="Only 1 is served.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: dict | None = Field(
        default=None,
        description='`{"type": "text" | "json_object" | "json_schema", "json_schema": {"name", "schema"}}` (the '
        "schema itself in place of `json_schema` is accepted). The output is constrained to it as it is generated; "
        "a schema that cannot be enforced, or a model that cannot constrain its output, is refused with 400.",
    )


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1, description="The conversation, oldest first.")
    tools: list[ToolIn] | None = Field(
        default=None, description="Functions the model may call; their arguments always validate against `parameters`."
    )
    tool_choice: str | dict | None = Field(
        default=None, description='`"auto"` (default with tools), `"none"`, `"required"`, or a named function.'
    )
    functions: list[FunctionDefinition] | None = Field(default=None, description="The legacy form of `tools`.")
    function_call: str | dict | None = Field(default=None, description="The legacy form of `tool_choice`.")


class CompletionRequest(SamplingFields):
    prompt: str | list[str] = Field(description="The text to continue (a list of one text is accepted).")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str = Field(description="A JSON object as text; it validates against the tool's parameters.")


class ToolCallOut(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = Field(description="The answer; null when the model called tools without text.")
    tool_calls: list[ToolCallOut] | None = None
    function_call: FunctionCallOut | None = Field(default=None, description="With the legacy `functions` only.")
    reasoning_content: str | None = Field(default=None, description="The thinking of a reasoning model.")

    @model_serializer(mode="wrap")
    def _without_absent_extras(self, handler: SerializerFunctionWrapHandler) -> dict:
        """`content` is always there (null or text: Dify reads the key); the other fields only when set."""
        data = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in ("role", "content")}


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    finish_reason: Literal["stop", "length", "tool_calls", "function_call"]
    logprobs: None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: CompletionUsage


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


# Audio -----------------------------------------------------------------------------------------


class SpeechRequest(BaseModel):
    """OpenAI's speech request, as Dify's OpenAI-API-compatible provider and OpenAI's clients send it."""

    # Clients send fields this API does not use (instructions); they are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: ModelName
    input: str = Field(description="The text to speak.", examples=["Hello from modelplane."])
    voice: str = Field(
        default="",
        description="One of the model's voices; OpenAI's names (alloy, echo, ...) speak with its default voice.",
        examples=["alloy"],
    )
    response_format: str = Field(
        default="mp3", description="`mp3`, `wav`, `opus`, `flac` or `pcm` (16-bit, 24 kHz, mono).", examples=["mp3"]
    )
    speed: float | None = Field(default=None, description="Speaking rate, 0.25 to 4; 1 is the voice's own.")
    stream_format: str | None = Field(default=None, description="`audio` (the only one served).")


class TranscriptionSegment(BaseModel):
    id: int
    seek: int
    start: float
    end: float
    text: str
    tokens: list[int]
    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float


class TranscriptionResponse(BaseModel):
    """`json` gives `text` alone; `verbose_json` adds the language, duration and segments."""

    text: str
    task: Literal["transcribe"] | None = None
    language: str | None = None
    duration: float | None = None
    segments: list[TranscriptionSegment] | None = None
