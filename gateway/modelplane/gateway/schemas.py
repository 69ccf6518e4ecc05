"""Request and response bodies of the OpenAI-compatible API, as Dify's provider sends and reads them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class EmbeddingsRequest(BaseModel):
    # Clients send fields this API does not use (user, dimensions); they are accepted and ignored.
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1, description="Name of the embedding model.")
    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text, a list of texts, token ids, or a list of token-id lists."
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


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "modelplane"
    task: str = Field(description="embedding, rerank or generation.")
    state: str = Field(description="Lifecycle state: READY, or a state from which a request loads it.")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
