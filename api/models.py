"""GET /v1/models and /v1/models/{id}: the served model, once per name it is served as, as OpenAI model objects."""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.protocol import ModelCard, ModelList
from api.state import ServerState, error_responses, get_state

router = APIRouter()


def _card(state: ServerState, name: str) -> ModelCard:
    return ModelCard(id=name, created=state.created, root=state.model_name, max_model_len=state.max_model_len)


@router.get("/v1/models", response_model=ModelList, responses=error_responses(401, 503))
async def list_models(request: Request) -> ModelList:
    state = get_state(request)
    return ModelList(data=[_card(state, name) for name in state.model_names])


# `:path` because hub ids contain a slash ("Qwen/Qwen3-0.6B").
@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=error_responses(401, 404, 503))
async def retrieve_model(model_id: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_model(model_id)
    return _card(state, model_id)
