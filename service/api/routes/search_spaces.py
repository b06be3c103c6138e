"""/search-spaces: the shipped presets."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from search_spaces import list_presets, load_preset
from service.api.deps import OwnerDep
from service.api.schemas import SearchSpaceSummary
from service.errors import NotFoundError

router = APIRouter(prefix="/search-spaces", tags=["search spaces"])


@router.get("", response_model=list[SearchSpaceSummary])
def list_spaces(_owner: OwnerDep) -> list[SearchSpaceSummary]:
    out = []
    for name in list_presets():
        s = load_preset(name)
        out.append(
            SearchSpaceSummary(name=name, description=s.description, parameters=list(s.parameters))
        )
    return out


@router.get("/{name}")
def get_space(name: str, _owner: OwnerDep) -> dict[str, Any]:
    if name not in list_presets():
        raise NotFoundError(
            f"no search-space preset {name!r}; available: {', '.join(list_presets())}", field="name"
        )
    return {"name": name, **load_preset(name).model_dump(mode="json", exclude_none=True)}
